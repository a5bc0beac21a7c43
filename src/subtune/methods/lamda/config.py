from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from subtune.core.config import ConfigError, MethodConfig

INITS = ("svd_zero", "svd_identity_residual", "svd_sigma_residual", "code")


@dataclass
class LaMDAConfig(MethodConfig):
    """ΔW = (lora_alpha / r) · B S A with A frozen, S trainable, B trained then frozen column by column.

    init (spec L1): `svd_zero` (default: A = top-r right singular vectors, B = top-r left singular vectors, S = 0; the
    model is unchanged and the update is a pure delta), `svd_identity_residual`, `svd_sigma_residual` (both move the
    principal part out of W), or `code` (the released code: random A, B = 0, random S).
    Freezing (spec L4-L6): one rank component of B every T_f / r optimizer steps, largest singular value first, fully
    frozen at T_f = freeze_fraction · total steps (or `freeze_steps`); frozen columns are restored after every step
    and their Adam moments zeroed; at full freeze B leaves the optimizer and its state is freed.
    """

    method = "lamda"
    r: int = 64
    lora_alpha: float = 16.0
    init: str = "svd_zero"
    freeze_fraction: float = 0.3
    freeze_steps: int | None = None
    freeze_order: Literal["largest_first", "smallest_first"] = "largest_first"

    def validate(self) -> None:
        super().validate()
        if self.r < 1:
            raise ConfigError(f"{self.method}: r must be >= 1, got {self.r}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"{self.method}: lora_alpha must be > 0 (it scales the update), got {self.lora_alpha}")
        if self.init not in INITS:
            raise ConfigError(f"{self.method}: init {self.init!r} is not one of {list(INITS)}")
        if not 0.0 <= self.freeze_fraction <= 1.0:
            raise ConfigError(f"{self.method}: freeze_fraction must be in [0, 1], got {self.freeze_fraction}")
        if self.freeze_steps is not None and self.freeze_steps < 0:
            raise ConfigError(f"{self.method}: freeze_steps must be >= 0, got {self.freeze_steps}")


@dataclass
class LaMDAPlusConfig(LaMDAConfig):
    """LaMDA++: per-layer ranks from the normalised spectrum of each pre-trained weight under a global budget.

    Budget Σ r_l = (number of target matrices) · r. Energy p_i = σ_i² / Σσ² (or σ_i/σ_1, or σ_i/Σσ) is pooled over
    all matrices and the largest values are kept (one global threshold), in chunks of `rank_multiple`, with
    r_min ≤ r_l ≤ r_max.
    """

    method = "lamda++"
    rank_min: int = 8
    rank_max: int = 256
    rank_multiple: int = 8
    normalisation: Literal["energy", "max", "sum"] = "energy"

    def validate(self) -> None:
        super().validate()
        if self.rank_multiple < 1 or self.rank_min < self.rank_multiple or self.rank_max < self.rank_min:
            raise ConfigError(f"lamda++: need 1 <= rank_multiple <= rank_min <= rank_max, got rank_multiple="
                              f"{self.rank_multiple}, rank_min={self.rank_min}, rank_max={self.rank_max}")
        if self.rank_min % self.rank_multiple or self.rank_max % self.rank_multiple:
            raise ConfigError("lamda++: rank_min and rank_max must be multiples of rank_multiple")
        if self.r < self.rank_min:
            raise ConfigError(f"lamda++: r={self.r} sets a budget of r per matrix, below rank_min={self.rank_min}; "
                              f"set r >= rank_min or lower rank_min")
