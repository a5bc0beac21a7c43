"""A fingerprint of a base model, saved with adapters, so an adapter is never loaded onto another base."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from subtune.core.surgery import decoder_layers


def _tensor_digest(t: torch.Tensor) -> str:
    # Round to bf16 so the same base loaded in fp32, fp16 or bf16 gives the same digest.
    data = t.detach().to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture, linear shapes, and hashes of tensors no subtune method changes except `full`.

    Call it on the base *before* training (prepare does), since full fine-tuning changes every tensor.
    """
    layers = decoder_layers(model)
    cfg = model.config
    embed = model.get_input_embeddings().weight
    rows = min(16, embed.shape[0])
    shapes = {}
    for name, module in layers[0].named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and name.endswith("_proj"):
            shapes[name] = [getattr(module, "out_features", weight.shape[0]), getattr(module, "in_features", -1)]
    return {
        "model_type": getattr(cfg, "model_type", type(model).__name__),
        "num_hidden_layers": len(layers),
        "hidden_size": cfg.hidden_size,
        "vocab_size": embed.shape[0],
        "layer0_shapes": shapes,
        "embed_digest": _tensor_digest(embed[:rows]),
        "norm_digest": _tensor_digest(model.model.norm.weight),
    }


def check_fingerprint(saved: dict[str, Any], model: nn.Module, directory) -> None:
    from subtune.core.errors import AdapterLoadError

    current = fingerprint(model)
    diff = sorted(k for k in saved if current.get(k) != saved[k])
    if diff:
        details = "; ".join(f"{k}: adapter {saved[k]!r} vs model {current.get(k)!r}" for k in diff[:4])
        raise AdapterLoadError(
            f"the adapter in {directory} was trained on a different base model ({details}). Load it onto the base it "
            "was made from (adapter_config.json 'base_model_name_or_path' names it).")
