"""Write adapters in the PEFT LoRA format, so vLLM, lm-eval and `PeftModel.from_pretrained` can use them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from subtune.core import io
from subtune.core.errors import ExportError

PEFT_PREFIX = "base_model.model."


def lora_config_dict(*, r: int, lora_alpha: float, target_modules: list[str], base_name: str,
                     rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None
                     ) -> dict[str, Any]:
    """A minimal `adapter_config.json` for LoRA with the fields loaders need (no bias, no modules_to_save)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name or None,
        "r": int(r), "lora_alpha": float(lora_alpha), "target_modules": sorted(set(target_modules)),
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {},
    }


REPLACED_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "adapter.safetensors")


def write_peft_adapter(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write a PEFT adapter directory atomically (a reader sees the previous export or this one, never a mix)."""
    with io.atomic_directory(directory, replaces=REPLACED_FILES) as tmp:
        io.atomic_save_tensors(tmp / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
        io.atomic_write_json(tmp / "adapter_config.json", config)


def write_lora_factors(directory: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                       base_name: str, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Write factors {module path: (A [r x in], B [out x r])} as a PEFT LoRA with scale 1 per module; returns the
    rank per module.

    Each module gets `lora_alpha = r` through rank_pattern/alpha_pattern, so W + B @ A is the update as given. The
    factors come from `subtune.core.deltas.lora_factors`, which has already checked ranks against the cap (and
    built any SVD fallback); this only lays them out as PEFT and vLLM expect.
    """
    if not factors:
        raise ExportError("nothing to export: no module has a trained update")
    ranks = {name: int(a.shape[0]) for name, (a, _) in factors.items()}
    r = max(ranks.values())
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.to(dtype)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.to(dtype)
    config = lora_config_dict(
        r=r, lora_alpha=r, target_modules=list(factors), base_name=base_name,
        rank_pattern={n: k for n, k in ranks.items() if k != r},
        alpha_pattern={n: float(k) for n, k in ranks.items() if k != r},
    )
    write_peft_adapter(directory, tensors, config)
    return ranks
