"""LoRA and DoRA baselines, taken from the `peft` package (injected in place; never re-implemented)."""

from subtune.methods.lora.method import DoraConfig, LoraConfig, PeftLoraMethod

__all__ = ["LoraConfig", "DoraConfig", "PeftLoraMethod"]
