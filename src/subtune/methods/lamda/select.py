"""LaMDA policy: SVD-based projections per target matrix, and LaMDA++'s spectrum-based rank allocation."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from subtune.core.config import ConfigError
from subtune.methods.lamda.config import LaMDAConfig, LaMDAPlusConfig


def normalised_spectrum(singular_values: torch.Tensor, how: str) -> torch.Tensor:
    s = singular_values.double()
    if how == "energy":
        return s.pow(2) / s.pow(2).sum().clamp_min(1e-300)
    if how == "max":
        return s / s[0].clamp_min(1e-300)
    if how == "sum":
        return s / s.sum().clamp_min(1e-300)
    raise ConfigError(f"lamda++: unknown normalisation {how!r}; use energy, max or sum")


def allocate_ranks(spectra: dict[str, torch.Tensor], budget: int, rank_min: int, rank_max: int, multiple: int,
                   normalisation: str = "energy") -> dict[str, int]:
    """Global threshold over pooled normalised spectra, in chunks of `multiple`, each matrix within [min, max].

    Spectra are descending, so chunk scores descend within a matrix and taking the best chunks overall always takes
    prefixes. The ranks sum to `budget` whenever the budget is reachable in whole chunks.
    """
    ranks, chunks = {}, []
    for name, sv in spectra.items():
        p = normalised_spectrum(sv, normalisation)
        cap = min(rank_max, (p.numel() // multiple) * multiple)
        ranks[name] = min(rank_min, cap)
        for start in range(ranks[name], cap, multiple):
            chunks.append((float(p[start:start + multiple].sum()), name))
    remaining = (budget - sum(ranks.values())) // multiple
    if remaining < 0:
        raise ConfigError(f"lamda++: the budget {budget} is below rank_min x {len(spectra)} matrices; raise r or "
                          "lower rank_min")
    for _, name in sorted(chunks, key=lambda c: -c[0])[:remaining]:
        ranks[name] += multiple
    return ranks


def init_factors(weight: torch.Tensor, rank: int, init: str, scaling: float, generator: torch.Generator
                 ) -> dict[str, torch.Tensor]:
    """A (r × in), B (out × r), S (r × r), and the residual to subtract from W (None for pure-delta inits)."""
    out_f, in_f = weight.shape
    if init == "code":  # the released code: kaiming-uniform A (frozen), B = 0, S ~ nn.Linear default
        bound_a, bound_s = 1 / math.sqrt(in_f), 1 / math.sqrt(rank)
        a = (torch.rand(rank, in_f, generator=generator) * 2 - 1) * bound_a
        s = (torch.rand(rank, rank, generator=generator) * 2 - 1) * bound_s
        return {"A": a, "B": torch.zeros(out_f, rank), "S": s, "residual": None}
    u, sv, vh = torch.linalg.svd(weight.detach().float().cpu(), full_matrices=False)
    u, sv, vh = u[:, :rank], sv[:rank], vh[:rank]
    if init == "svd_zero":
        return {"A": vh, "B": u, "S": torch.zeros(rank, rank), "residual": None}
    if init == "svd_identity_residual":
        root = sv.sqrt()
        a, b = root[:, None] * vh, u * root
        return {"A": a, "B": b, "S": torch.eye(rank), "residual": scaling * (b @ a)}
    if init == "svd_sigma_residual":
        return {"A": vh, "B": u, "S": torch.diag(sv) / scaling, "residual": (u * sv) @ vh}
    raise ConfigError(f"lamda: unknown init {init!r}; use one of the LaMDAConfig init values")


def ranks_for(model: nn.Module, targets: dict[str, nn.Linear], config: LaMDAConfig, progress: bool = True
              ) -> dict[str, int]:
    if not isinstance(config, LaMDAPlusConfig):
        return {name: config.r for name in targets}
    spectra = {name: torch.linalg.svdvals(m.weight.detach().float())
               for name, m in tqdm(targets.items(), desc="lamda++ spectra", disable=not progress, leave=False)}
    return allocate_ranks(spectra, config.r * len(targets), config.rank_min, config.rank_max,
                          config.rank_multiple, config.normalisation)
