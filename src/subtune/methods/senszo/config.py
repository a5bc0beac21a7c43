from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from subtune.core.config import ConfigError, MethodConfig


@dataclass
class ZOConfig(MethodConfig):
    """SPSA settings shared by the zeroth-order methods (MeZO defaults: ε 1e-3, one direction).

    objective: "choice" (MeZO's cross-entropy over the candidate answers, scored by mean answer log-likelihood),
    "lm" (next-token loss on the answer), or "auto": choice when every training record has `choices`, else lm
    (resolved against the training records before training, `subtune.train.zo.resolve_objective`; the saved config
    holds the result). With the choice objective, `dev_size` training records are held out as a dev split, its
    choice loss and candidate-ranking accuracy are measured every `eval_every` steps and the values of the lowest
    dev loss are restored at the end (the paper's selection; dev_size 0: off). `dense_cache`: ZO training keeps
    each SensZOQ layer's dense weight dequant(D) + S (no dequantisation nor sparse gather per probe; costs one
    compute-dtype copy of each target weight).
    """

    eps: float = 1e-3
    directions: int = 1
    objective: Literal["auto", "lm", "choice"] = "auto"
    dev_size: int = 100
    eval_every: int = 50

    def validate(self) -> None:
        super().validate()
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"{self.method}: eps must be a finite number > 0, got {self.eps}; MeZO's default is 1e-3")
        if self.directions < 1:
            raise ConfigError(f"{self.method}: directions must be >= 1, got {self.directions}; use 1 (MeZO's default)")
        if not _whole(self.dev_size) or self.dev_size < 0:
            raise ConfigError(f"{self.method}: dev_size must be a whole number of records >= 0 (0: no dev split), got "
                              f"{self.dev_size!r}; e.g. 100")
        if not _whole(self.eval_every) or self.eval_every < 1:
            raise ConfigError(f"{self.method}: eval_every must be a whole number of steps >= 1, got "
                              f"{self.eval_every!r}; e.g. 50")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class MeZOConfig(ZOConfig):
    """MeZO: every parameter, perturbed in place and restored by regenerating z (as the paper; in fp16/bf16 the
    in-place perturb/restore rounds, so the weights drift a little every step)."""

    method = "mezo"


@dataclass
class SensZOConfig(ZOConfig):
    """SensZOQ: the `density` most sensitive entries of each target weight (summed per-sample squared gradients on
    calibration text), tuned by ZO as fp32 values; the rest of each weight frozen, optionally 4-bit NF4.

    mask_source: `sensitivity` (default), or the ablations `random` and `magnitude`; scope `per_matrix` (default,
    exactly ceil(density·numel) per matrix) or `global`; `mask_path`: a saved mask to reuse across tasks.
    """

    method = "senszo"
    density: float = 0.001
    scope: Literal["per_matrix", "global"] = "per_matrix"
    mask_source: Literal["sensitivity", "random", "magnitude"] = "sensitivity"
    calibration_samples: int = 100
    quantize: Literal["nf4", "none"] = "nf4"
    mask_path: str | None = None
    # where the sensitivity is measured: the embedded pretraining text (the paper: C4 text), or the task's data
    calibration_source: Literal["corpus", "train"] = "corpus"
    dense_cache: bool = True

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.density <= 1.0:  # also refuses nan
            raise ConfigError(f"senszo: density must be in (0, 1] (a share of each weight; 0 trains nothing), got "
                              f"{self.density}; the paper uses 0.001")
        if self.calibration_samples < 1:
            raise ConfigError(f"senszo: calibration_samples must be >= 1, got {self.calibration_samples}; the paper "
                              "uses 100")
        if self.mask_path is not None and not str(self.mask_path).strip():
            raise ConfigError("senszo: mask_path is empty; give a mask file from `subtune senszo-mask`, or None")
