from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from subtune.core.config import ConfigError, MethodConfig

ATTENTION = ("q_proj", "k_proj", "v_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SCORES = ("abs_of_mean", "mean_of_abs", "l1", "l2")


@dataclass
class SMTConfig(MethodConfig):
    """Which b×b blocks SMT trains, chosen by warm-up gradients.

    Budget: `ratio` of all 2-D blocks of the model (the official definition: every 2-D parameter, embeddings and
    lm_head included, counted as (rows/b)·(cols/b)) or an absolute `num_blocks`. MLP blocks have their own budget
    (`mlp_ratio` / `mlp_num_blocks`, off by default as in the paper's main setting).

    Warm-up: `warmup_steps` calibration batches. Default (`warmup_updates=False`) sums gradients at the base weights
    with no optimizer step: no full-FT memory, and the update stays a pure block delta against the original base
    (exact LoRA export). `warmup_updates=True` reproduces the official code: real AdamW steps on every weight during
    warm-up (full-FT memory; the base changes, so exports are only exact against the warmed-up model).
    """

    method = "smt"
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION))
    mlp_modules: list[str] = field(default_factory=lambda: list(MLP))
    block_size: int = 256
    ratio: float = 0.0084
    num_blocks: int | None = None
    mlp_ratio: float = 0.0
    mlp_num_blocks: int | None = None
    score: str = "abs_of_mean"
    scope: Literal["global", "per_matrix"] = "global"
    warmup_steps: int = 10  # the paper: 100 of thousands of steps; each is one more forward + backward before
    # training (100 doubled a 100-step run on the embedded model), so 10 keeps it at ~10% of a short run (DEFAULTS.md)
    warmup_updates: bool = False
    warmup_lr: float = 9.65e-6

    def validate(self) -> None:
        super().validate()
        for name, allowed in (("target_modules", ATTENTION + MLP), ("mlp_modules", MLP)):
            bad = sorted(set(getattr(self, name)) - set(allowed))
            if bad:
                raise ConfigError(f"smt: {name} may hold {list(allowed)}, not {bad}")
        if self.block_size < 1:
            raise ConfigError(f"smt: block_size must be >= 1, got {self.block_size}")
        for name in ("ratio", "mlp_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"smt: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.score not in SCORES:
            raise ConfigError(f"smt: score {self.score!r} is not one of {list(SCORES)}")
        if self.warmup_steps < 1:
            raise ConfigError("smt: warmup_steps must be >= 1 (selection needs at least one gradient)")
        if self.warmup_lr <= 0:
            raise ConfigError(f"smt: warmup_lr must be > 0, got {self.warmup_lr}")
        for name in ("num_blocks", "mlp_num_blocks"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"smt: {name} must be >= 0, got {value}")
        if not self.attention_budget_set() and not self.mlp_budget_set():
            raise ConfigError("smt: the budget is zero blocks (ratio/num_blocks and mlp_ratio/mlp_num_blocks are all "
                              "0), so nothing would train; set ratio > 0 or num_blocks >= 1")

    def attention_budget_set(self) -> bool:
        return bool(self.num_blocks) if self.num_blocks is not None else self.ratio > 0

    def mlp_budget_set(self) -> bool:
        mlp = [m for m in self.mlp_modules if m not in self.target_modules]
        budget = bool(self.mlp_num_blocks) if self.mlp_num_blocks is not None else self.mlp_ratio > 0
        return budget and bool(mlp)
