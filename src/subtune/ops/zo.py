"""Zeroth-order SPSA with the seed trick (MeZO): perturb, evaluate twice, restore, update — forward passes only.

    g_j = (L(θ + ε z_j) − L(θ − ε z_j)) / 2ε          z_j ~ N(0, I) regenerated from seed_j, never stored
    θ  ← θ − lr · (1/n) Σ_j g_j z_j

z comes from a dedicated torch.Generator per step and direction (never the global RNG), drawn for the tensors in a
fixed order. With `exact_restore` the tensors are copied before the perturbation and copied back afterwards, so
restoring cannot drift, and z is drawn once per direction (the small sparse value vectors); otherwise they are
restored by regenerating z, as MeZO does (no copy of the model).

Data parallel: ranks sharing the seeds draw the same z, so averaging the two scalar losses (`reduce=`) is the only
communication a step needs; no gradient all-reduce, no weight broadcast.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from subtune.core.errors import SubtuneError


class ZOError(SubtuneError, ValueError):
    """A zeroth-order step that cannot be taken as asked (a `reduce` that does not return the reduced losses)."""


def _noise(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # drawn in fp32 on the CPU generator then moved: the same z for the same seed on any device and dtype
    return torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.device, tensor.dtype)


def _perturb(tensors: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    for t in tensors:
        t.add_(_noise(t, generator), alpha=scale)


def _draw(tensors: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """z for every tensor, drawn once (the same z `_perturb` regenerates for this seed)."""
    generator = torch.Generator().manual_seed(seed)
    return [_noise(t, generator) for t in tensors]


@torch.no_grad()
def spsa_step(tensors: Sequence[torch.Tensor], loss_fn: Callable[[], torch.Tensor], seeds: Sequence[int], eps: float,
              lr: float, exact_restore: bool = True,
              reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """One ZO-SGD step over `tensors` (modified in place). Returns the losses and projected gradients.

    Exact restore (small tensors, SensZOQ's sparse values): z is drawn once per direction and kept for the two
    probes and the update (memory: one more copy of the tensors, besides the restore copy). Regeneration (MeZO:
    every weight, no copy): z is drawn three times per direction, and the last direction's restore and update are
    one pass, θ + (ε − lr·g/n)·z, instead of two.

    `reduce` makes it data parallel with O(1) communication: every rank calls spsa_step with the same seeds on its
    own part of the batch, and `reduce` (e.g. `subtune.core.distributed.all_reduce_mean`) turns the (directions, 2)
    fp64 tensor of this rank's L+ and L− into the value over all ranks, in one collective per step. Each rank then
    draws the same z and applies the same update, so the tensors stay identical without any gradient or weight
    exchange. The mean of the ranks' losses is the loss over their union only when every rank's loss is a mean over
    the same number of terms (equal per-rank batches of equal loss-token counts); otherwise pass a weighted reduce.
    """
    losses = torch.empty(len(seeds), 2, dtype=torch.float64)
    kept: list[list[torch.Tensor]] = []
    for j, seed in enumerate(seeds):
        last = j == len(seeds) - 1
        if exact_restore:
            saved = [t.clone() for t in tensors]
            zs = _draw(tensors, seed)
            kept.append(zs)
            for t, z in zip(tensors, zs):
                t.add_(z, alpha=eps)
            losses[j, 0] = float(loss_fn())
            for t, z in zip(tensors, zs):
                t.add_(z, alpha=-2 * eps)
            losses[j, 1] = float(loss_fn())
            for t, s in zip(tensors, saved):
                t.copy_(s)
        else:
            _perturb(tensors, seed, eps)
            losses[j, 0] = float(loss_fn())
            _perturb(tensors, seed, -2 * eps)
            losses[j, 1] = float(loss_fn())
            if not last:  # the last direction restores together with its update, below
                _perturb(tensors, seed, eps)
    if reduce is not None:
        try:
            losses = _reduced(reduce, losses)
        except BaseException:
            if not exact_restore:  # the last direction is still at θ − εz: restore it before raising
                _perturb(tensors, seeds[-1], eps)
            raise
    pairs = losses.tolist()
    grads = [(plus - minus) / (2 * eps) for plus, minus in pairs]
    for j, (seed, g) in enumerate(zip(seeds, grads)):
        step = -lr * g / len(seeds)
        if exact_restore:
            for t, z in zip(tensors, kept[j]):
                t.add_(z, alpha=step)
        else:
            _perturb(tensors, seed, step + (eps if j == len(seeds) - 1 else 0.0))
    return {"loss": sum((plus + minus) / 2 for plus, minus in pairs) / len(pairs), "projected_grads": grads,
            "seeds": list(seeds)}


def _reduced(reduce: Callable[[torch.Tensor], torch.Tensor], losses: torch.Tensor) -> torch.Tensor:
    """`reduce(losses)` as a CPU fp64 tensor of the same shape, or a ZOError before any tensor is updated."""
    out = reduce(losses)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(losses.shape):
        got = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a tensor of shape {tuple(out.shape)}"
        raise ZOError(f"spsa_step: reduce returned {got}, not the reduced losses of shape {tuple(losses.shape)}; "
                      "pass a function that returns the reduced tensor, such as "
                      "subtune.core.distributed.all_reduce_mean (torch.distributed.all_reduce works in place and "
                      "returns None)")
    return out.detach().to("cpu", torch.float64)


def replay(tensors: Sequence[torch.Tensor], history: Sequence[dict], lr_of_step: Callable[[int], float]) -> None:
    """Re-apply recorded steps ({'seeds', 'projected_grads'} per step) from the initial values: no forward passes."""
    with torch.no_grad():
        for step, record in enumerate(history):
            n = len(record["seeds"])
            for seed, g in zip(record["seeds"], record["projected_grads"]):
                _perturb(tensors, seed, -lr_of_step(step) * g / n)
