"""LoRA / DoRA configs (PEFT's own implementation is used; these are the fields subtune exposes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from subtune.core.config import LORA_TARGETS, ConfigError, MethodConfig

if TYPE_CHECKING:  # peft loads when a LoRA is built, not when the config is imported
    import peft


@dataclass
class LoraConfig(MethodConfig):
    """PEFT LoRA. Defaults follow the LLM-Adapters/DoRA setup (q, k, v, up, down)."""

    method = "lora"
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.r < 1:
            raise ConfigError(f"{self.method}: r must be >= 1, got {self.r}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"{self.method}: lora_alpha must be > 0 (it scales the update), got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"{self.method}: lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def to_peft(self) -> peft.LoraConfig:
        import peft

        return peft.LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                               target_modules=list(self.target_modules), use_dora=self.method == "dora",
                               bias="none", task_type="CAUSAL_LM")


@dataclass
class DoraConfig(LoraConfig):
    """PEFT DoRA (LoRA with a learned magnitude vector)."""

    method = "dora"
