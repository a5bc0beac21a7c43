from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from subtune.core.config import ConfigError, MethodConfig


@dataclass
class ZOConfig(MethodConfig):
    """SPSA settings shared by the zeroth-order methods (MeZO defaults: ε 1e-3, one direction)."""

    eps: float = 1e-3
    directions: int = 1
    objective: Literal["lm", "choice"] = "lm"  # choice: MeZO's loss over candidate answers (records with choices)

    def validate(self) -> None:
        super().validate()
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"{self.method}: eps must be a finite number > 0, got {self.eps}; MeZO's default is 1e-3")
        if self.directions < 1:
            raise ConfigError(f"{self.method}: directions must be >= 1, got {self.directions}; use 1 (MeZO's default)")


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
