"""A fingerprint of a base model, saved with adapters, so an adapter is never loaded onto another base.

Besides the architecture and layer shapes it hashes a handful of deterministically chosen rows and columns of every
weight in the decoder layers (and of the embeddings and an untied LM head), so two bases that share embeddings but
differ anywhere in their decoder — another fine-tune, a merged model — are told apart, while a 7B base is still hashed
in well under a second (a few thousand values per matrix, never a full pass over the weights). Values are rounded to
bf16 first, so the same base loaded in fp32, fp16 or bf16 gives the same digests.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from subtune.core.surgery import decoder_layers

SAMPLES = 4  # rows and columns hashed per matrix
_KNUTH = 2654435761  # a fixed multiplicative hash: the sampled positions never depend on a library's RNG


def _tensor_digest(t: torch.Tensor) -> str:
    # Round to bf16 so the same base loaded in fp32, fp16 or bf16 gives the same digest.
    data = t.detach().to("cpu", torch.float32).to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def sample_positions(n: int, k: int = SAMPLES) -> list[int]:
    """k distinct positions in [0, n), spread by a fixed hash (first and last included), the same on every run."""
    if n <= k:
        return list(range(n))
    picks = {0, n - 1}
    j = 1
    while len(picks) < k:
        picks.add((j * _KNUTH + 12345) % n)
        j += 1
    return sorted(picks)


def _sampled_digest(weight: torch.Tensor) -> str:
    """Digest of a few whole rows and columns of a matrix (a vector is hashed whole: norms, biases are small)."""
    w = weight.detach()
    if w.ndim < 2:
        return _tensor_digest(w)
    w = w.reshape(w.shape[0], -1)
    rows = torch.tensor(sample_positions(w.shape[0]), device=w.device)
    cols = torch.tensor(sample_positions(w.shape[1]), device=w.device)
    sample = torch.cat([w.index_select(0, rows).reshape(-1), w.index_select(1, cols).reshape(-1)])
    return _tensor_digest(sample) + f":{tuple(w.shape)}"


def weight_digests(model: nn.Module) -> dict[str, str]:
    """{parameter name: digest} for every decoder-layer parameter, the input embeddings and an untied LM head."""
    decoder_layers(model)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        in_layers = ".layers." in f".{name}"
        is_embed = p is embed
        is_head = head is not None and p is getattr(head, "weight", None) and p is not embed
        if in_layers or is_embed or is_head:
            out[name] = _sampled_digest(p)
    return out


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture, linear shapes, and hashes of the base weights.

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
        "weight_digests": weight_digests(model),
    }


def fingerprint_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first difference between two fingerprints, in words, or None. Only keys in `saved` are compared, so an
    adapter written with an older, smaller fingerprint is still checked on what it has."""
    for key, value in saved.items():
        if key == "weight_digests" and isinstance(value, dict) and isinstance(current.get(key), dict):
            now = current[key]
            for tensor in [t for t in now if t in value] + [t for t in value if t not in now]:  # in model order
                if now.get(tensor) != value[tensor]:
                    return (f"tensor {tensor} differs" if tensor in now else
                            f"tensor {tensor} does not exist in the model")
        elif current.get(key) != value:
            return f"{key}: adapter {value!r} vs model {current.get(key)!r}"
    return None


def check_fingerprint(saved: dict[str, Any], model: nn.Module, directory) -> None:
    from subtune.core.errors import AdapterLoadError

    diff = fingerprint_difference(saved, fingerprint(model))
    if diff:
        raise AdapterLoadError(
            f"the adapter in {directory} was trained on a different base model ({diff}). Load it onto the base it "
            "was made from (adapter_config.json 'base_model_name_or_path' names it).")
