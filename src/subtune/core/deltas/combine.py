"""Operations over several deltas: fusion (weighted sums) and LoRA factors for a whole adapter."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from subtune.core.deltas.kinds import Delta, DeltaError
from subtune.core.errors import ExportError


def fuse(deltas: Sequence[Delta], weights: Sequence[float] | None = None) -> Delta:
    """Σ wᵢ · deltaᵢ for deltas of one module (weights default to 1); `Delta.__add__` says which kind results."""
    deltas = list(deltas)
    if not deltas:
        raise DeltaError("fuse needs at least one delta")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise DeltaError(f"fuse got {len(deltas)} deltas but {len(weights)} weights; give one weight per delta")
    total = None
    for delta, weight in zip(deltas, weights):
        term = delta if weight == 1 else delta.scaled(weight)
        total = term if total is None else total + term
    return total


def lora_factors(deltas: Mapping[str, Delta], max_rank: int, fallback: str = "error",
                 option_names: Mapping[str, str] | None = None
                 ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """{module path: (A, B)} with B @ A each module's update (scale folded into B), for a PEFT LoRA at scale 1.

    Every module's exact rank is checked before any factor is built, so an over-cap adapter fails at once with the
    largest offender named (fallback="error"), or gets SVD factors for the over-cap modules (fallback="svd"; their
    relative errors are in info["svd_errors"]). `option_names` spells the fixes as the caller's user knows them
    (keys "max_rank", "merged", "fallback_svd"; the CLI: its flags).
    """
    if not deltas:
        raise ExportError("nothing to export: no module has a trained update")
    if fallback not in ("error", "svd"):
        raise ExportError(f"fallback must be 'error' or 'svd', got {fallback!r}")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ExportError(f"max_rank must be a positive int, got {max_rank!r}")
    needed = {name: delta.exact_lora_rank() for name, delta in deltas.items()}
    too_big = {name: r for name, r in needed.items() if r > max_rank}
    if too_big and fallback == "error":
        worst = max(too_big.items(), key=lambda kv: kv[1])
        names = {"max_rank": "max_rank", "merged": "subtune.merge()", "fallback_svd": "fallback='svd'",
                 **(option_names or {})}
        raise ExportError(
            f"{len(too_big)} module(s) need a LoRA rank above max_rank={max_rank} (largest: {worst[0]} rank "
            f"{worst[1]}); raise {names['max_rank']} (vLLM accepts at most 512), train a smaller budget, export a "
            f"merged model with {names['merged']}, or pass {names['fallback_svd']} for an approximate export")
    factors, ranks, svd_errors = {}, {}, {}
    for name, delta in deltas.items():
        a, b, scale, info = delta.to_lora(max_rank, fallback, name=name)
        factors[name] = (a, b if scale == 1.0 else b * scale)
        ranks[name] = info["rank"]
        if not info["exact"]:
            svd_errors[name] = info["error"]
    out = {"modules": len(factors), "ranks": ranks, "max_rank": max(ranks.values()), "exact": not svd_errors}
    if svd_errors:
        out["svd_errors"] = svd_errors
        out["max_svd_error"] = max(svd_errors.values())
    return factors, out
