"""Zeroth-order SPSA with the seed trick (MeZO): perturb, evaluate twice, restore, update — forward passes only.

    g_j = (L(θ + ε z_j) − L(θ − ε z_j)) / 2ε          z_j ~ N(0, I) regenerated from seed_j, never stored
    θ  ← θ − lr · (1/n) Σ_j g_j z_j

z comes from a dedicated torch.Generator per step and direction (never the global RNG), drawn for the tensors in a
fixed order. Tensors listed in `exact_restore` are copied before the perturbation and copied back afterwards, so
restoring cannot drift (for the small sparse value vectors); the rest are restored by regenerating z, as MeZO does.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def _noise(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # drawn in fp32 on the CPU generator then moved: the same z for the same seed on any device and dtype
    return torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.device, tensor.dtype)


def _perturb(tensors: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    for t in tensors:
        t.add_(_noise(t, generator), alpha=scale)


@torch.no_grad()
def spsa_step(tensors: Sequence[torch.Tensor], loss_fn: Callable[[], torch.Tensor], seeds: Sequence[int], eps: float,
              lr: float, exact_restore: bool = True) -> dict:
    """One ZO-SGD step over `tensors` (modified in place). Returns the losses and projected gradients."""
    grads, losses = [], []
    for seed in seeds:
        saved = [t.clone() for t in tensors] if exact_restore else None
        _perturb(tensors, seed, eps)
        loss_plus = float(loss_fn())
        _perturb(tensors, seed, -2 * eps)
        loss_minus = float(loss_fn())
        if saved is not None:
            for t, s in zip(tensors, saved):
                t.copy_(s)
        else:
            _perturb(tensors, seed, eps)
        grads.append((loss_plus - loss_minus) / (2 * eps))
        losses.append((loss_plus + loss_minus) / 2)
    for seed, g in zip(seeds, grads):
        _perturb(tensors, seed, -lr * g / len(seeds))
    return {"loss": sum(losses) / len(losses), "projected_grads": grads, "seeds": list(seeds)}


def replay(tensors: Sequence[torch.Tensor], history: Sequence[dict], lr_of_step: Callable[[int], float]) -> None:
    """Re-apply recorded steps ({'seeds', 'projected_grads'} per step) from the initial values: no forward passes."""
    with torch.no_grad():
        for step, record in enumerate(history):
            n = len(record["seeds"])
            for seed, g in zip(record["seeds"], record["projected_grads"]):
                _perturb(tensors, seed, -lr_of_step(step) * g / n)
