from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from subtune.core.config import ConfigError, MethodConfig

COMPONENTS = {"o_proj": "o_ratio", "v_proj": "v_ratio", "down_proj": "d_ratio", "up_proj": "u_ratio"}
STRATEGIES = ("random", "weight", "activation", "weight_activation", "gradient")


@dataclass
class S2FTConfig(MethodConfig):
    """Which heads and channels S²FT trains.

    Ratios are fractions of all candidate units in the model: query heads for O (columns of o_proj), KV heads for V
    (rows of v_proj), FFN channels for Down (columns of down_proj) and Up (rows of up_proj). `None` means the paper's
    default for the model: MHA -> o 0.052 + d 0.02 (LLaMA2-7B script); GQA -> Down only, d 0.03 (LLaMA3-8B script).

    `disjoint_from` names saved adapter directories whose heads/channels this run must not train (the paper's
    non-overlapping fusion variant): selection draws only from the units those adapters left free, per trained
    matrix, at the same budget (ratios stay fractions of all units). The directories are read at selection time,
    not here, so a saved config still loads after they are gone.
    """

    method = "s2ft"
    target_modules: list[str] = field(default_factory=lambda: list(COMPONENTS))
    o_ratio: float | None = None
    v_ratio: float | None = None
    d_ratio: float | None = None
    u_ratio: float | None = None
    train_gate_with_up: bool = False  # the official code never trains Gate; this trains Gate rows of Up channels too
    strategy: str = "random"
    direction: Literal["large", "small"] = "large"
    allocation: Literal["global", "uniform"] = "global"
    calibration_batches: int = 8
    disjoint_from: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.disjoint_from, (list, tuple)):  # Path objects are fine: stored as plain strings
            self.disjoint_from = [os.fspath(d) if isinstance(d, os.PathLike) else d for d in self.disjoint_from]
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        for i, directory in enumerate(self.disjoint_from):
            if not directory.strip():
                raise ConfigError(f"s2ft: disjoint_from[{i}] is an empty path; give adapter directories written by "
                                  "subtune.save (CLI: --disjoint_from DIR,DIR)")
        if len(set(self.disjoint_from)) != len(self.disjoint_from):
            twice = next(d for d in self.disjoint_from if self.disjoint_from.count(d) > 1)
            raise ConfigError(f"s2ft: disjoint_from names {twice!r} twice; give each adapter directory once")
        unknown = sorted(set(self.target_modules) - set(COMPONENTS))
        if unknown:
            raise ConfigError(f"s2ft trains {sorted(COMPONENTS)} only; remove {unknown} from target_modules")
        for module, name in COMPONENTS.items():
            ratio = getattr(self, name)
            if ratio is not None and not 0.0 <= ratio <= 1.0:
                raise ConfigError(f"s2ft: {name} must be in [0, 1], got {ratio}")
            if ratio and module not in self.target_modules:
                raise ConfigError(f"s2ft: {name}={ratio} but {module} is not in target_modules")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"s2ft: strategy {self.strategy!r} is not one of {list(STRATEGIES)}")
        if self.calibration_batches < 1:
            raise ConfigError(f"s2ft: calibration_batches must be >= 1, got {self.calibration_batches}")
        chosen = {n: getattr(self, n) for n in COMPONENTS.values() if getattr(self, n) is not None}
        if chosen and not any(chosen.values()):
            raise ConfigError(f"s2ft: every ratio is 0 ({', '.join(f'{k}={v}' for k, v in chosen.items())}), so "
                              "nothing would train; give at least one ratio > 0 (e.g. d_ratio=0.03)")

    def resolved_ratios(self, is_gqa: bool) -> dict[str, float]:
        """Ratio per module; unset ratios take the paper's default for MHA or GQA models."""
        defaults = ({"o_proj": 0.0, "v_proj": 0.0, "down_proj": 0.03, "up_proj": 0.0} if is_gqa else
                    {"o_proj": 0.052, "v_proj": 0.0, "down_proj": 0.02, "up_proj": 0.0})
        if any(getattr(self, n) is not None for n in COMPONENTS.values()):
            defaults = dict.fromkeys(COMPONENTS, 0.0)  # the user chose: unset means off
        return {m: (getattr(self, n) if getattr(self, n) is not None else defaults[m]) if m in self.target_modules
                else 0.0 for m, n in COMPONENTS.items()}
