"""Write and read adapters in the PEFT LoRA format, so vLLM, lm-eval and `PeftModel.from_pretrained` can use them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from subtune.core import io
from subtune.core.errors import ExportError

PEFT_PREFIX = "base_model.model."


def lora_config_dict(*, r: int, lora_alpha: float, target_modules: list[str], base_name: str,
                     rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
                     use_dora: bool = False) -> dict[str, Any]:
    """A minimal `adapter_config.json` for LoRA with the fields loaders need (no bias, no modules_to_save)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name or None,
        "r": int(r), "lora_alpha": float(lora_alpha), "target_modules": sorted(set(target_modules)),
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": use_dora, "fan_in_fan_out": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {},
    }


REPLACED_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "adapter.safetensors")


def write_peft_adapter(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write a PEFT adapter directory atomically (a reader sees the previous export or this one, never a mix)."""
    with io.atomic_directory(directory, replaces=REPLACED_FILES) as tmp:
        io.atomic_save_tensors(tmp / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
        io.atomic_write_json(tmp / "adapter_config.json", config)


def svd_truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of B·A and the relative Frobenius error of the approximation."""
    full = b.double() @ a.double()
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    b_new, a_new = u[:, :rank] * s[:rank], vh[:rank]
    error = float(torch.linalg.norm(full - b_new @ a_new) / torch.linalg.norm(full).clamp_min(1e-30))
    return a_new.float().contiguous(), b_new.float().contiguous(), error


def write_lora_factors(directory: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                       base_name: str, max_rank: int, fallback: str = "error",
                       dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Write factors {module path: (A [r x in], B [out x r])} as a PEFT LoRA with scale 1 per module.

    Each module gets `lora_alpha = r` through rank_pattern/alpha_pattern, so W + B @ A is the update as given.
    A module whose rank exceeds `max_rank` raises ExportError, or with fallback="svd" is replaced by its best
    rank-`max_rank` approximation; the relative errors are returned under "svd_errors".
    """
    if not factors:
        raise ExportError("nothing to export: no module has a trained update")
    if fallback not in ("error", "svd"):
        raise ExportError(f"fallback must be 'error' or 'svd', got {fallback!r}")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ExportError(f"max_rank must be an integer >= 1, got {max_rank!r}; pass e.g. max_rank=512")
    too_big = {name: a.shape[0] for name, (a, _) in factors.items() if a.shape[0] > max_rank}
    svd_errors = {}
    if too_big and fallback == "svd":
        factors = dict(factors)
        for name in too_big:
            a, b, svd_errors[name] = svd_truncate(*factors[name], max_rank)
            factors[name] = (a, b)
        too_big = {}
    if too_big:
        worst = max(too_big.items(), key=lambda kv: kv[1])
        raise ExportError(
            f"{len(too_big)} module(s) need a LoRA rank above max_rank={max_rank} (largest: {worst[0]} rank "
            f"{worst[1]}); raise max_rank (vLLM accepts at most 512), train a smaller budget, export a merged "
            "model with subtune.merge(), or pass fallback='svd' for an approximate export")
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
    info = {"modules": len(factors), "max_rank": r, "ranks": ranks, "directory": str(directory), "exact": not svd_errors}
    if svd_errors:
        info["svd_errors"] = svd_errors
        info["max_svd_error"] = max(svd_errors.values())
    return info
