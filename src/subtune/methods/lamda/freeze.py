"""Gradual freezing of LaMDA's B (PMB): the schedule as a plain-loop helper (its HF TrainerCallback is in
callback.py, so importing the method loads no transformers)."""

from __future__ import annotations

import math

import torch
from torch import nn

from subtune.ops.lowdim import LowDimLinear


FROZEN_ATTR = "pmb_frozen"  # on each LowDimLinear: bool (rank,), True where a column of B is frozen


def frozen_columns(layer: LowDimLinear) -> torch.Tensor:
    """Which columns of the layer's B are frozen (a copy): what the freezer recorded, all once B left training."""
    if not layer.lora_B.requires_grad:
        return torch.ones(layer.rank, dtype=torch.bool, device=layer.lora_B.device)
    mask = vars(layer).get(FROZEN_ATTR)
    return torch.zeros(layer.rank, dtype=torch.bool, device=layer.lora_B.device) if mask is None else mask.clone()


def set_frozen_columns(layer: LowDimLinear, mask: torch.Tensor) -> None:
    """Record a saved frozen-column mask on the layer (a new PMBFreezer starts its schedule afresh)."""
    vars(layer)[FROZEN_ATTR] = mask.to(device=layer.lora_B.device, dtype=torch.bool).clone()


def frozen_components(step: int, rank: int, horizon: int) -> int:
    """k(s) = min(r, floor(r·s / T_f)): component i freezes at ceil((i+1)·T_f / r); all are frozen at T_f."""
    if horizon <= 0:
        return rank
    return min(rank, (rank * step) // horizon)


class PMBFreezer:
    """Call `after_step(optimizer, step)` after every optimizer step (the callback below does it for the Trainer).

    Frozen columns get a zero gradient (so clipping ignores them), are restored to their frozen values after each
    step (so AdamW momentum and decoupled weight decay cannot move them) and have their Adam moments zeroed. At full
    freeze B stops requiring grad, leaves the optimizer's param groups and its state is deleted.
    """

    def __init__(self, model: nn.Module, total_steps: int, freeze_fraction: float = 0.3,
                 freeze_steps: int | None = None, order: str = "largest_first"):
        self.layers = [m for m in model.modules() if isinstance(m, LowDimLinear)]
        self.horizon = freeze_steps if freeze_steps is not None else math.ceil(freeze_fraction * total_steps)
        self.order = order
        self.frozen: dict[int, int] = {id(layer): 0 for layer in self.layers}
        self.snapshots: dict[int, torch.Tensor] = {}
        self.masks: dict[int, torch.Tensor] = {}
        for layer in self.layers:
            self.masks[id(layer)] = torch.ones(layer.rank, dtype=layer.lora_B.dtype, device=layer.lora_B.device)
            set_frozen_columns(layer, self.masks[id(layer)] == 0)
            layer.lora_B.register_hook(lambda g, key=id(layer): g * self.masks[key])

    def _columns(self, layer: LowDimLinear, count: int) -> torch.Tensor:
        order = torch.arange(layer.rank, device=layer.lora_B.device)
        return (order if self.order == "largest_first" else order.flip(0))[:count]

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap accelerate's AcceleratedOptimizer
        for layer in self.layers:
            b, key = layer.lora_B, id(layer)
            if not b.requires_grad:
                continue
            k = frozen_components(step, layer.rank, self.horizon)
            if k > self.frozen[key]:
                newly = self._columns(layer, k)[self.frozen[key]:]
                snap = self.snapshots.setdefault(key, b.detach().clone())
                snap[:, newly] = b[:, newly]
                self.masks[key][newly] = 0
                self.frozen[key] = k
                set_frozen_columns(layer, self.masks[key] == 0)  # saved with the adapter (training state)
            if self.frozen[key] == 0:
                continue
            cols = self._columns(layer, self.frozen[key])
            b[:, cols] = self.snapshots[key][:, cols]
            state = optimizer.state.get(b, {}) if optimizer is not None else {}
            for name in ("exp_avg", "exp_avg_sq"):
                if name in state:
                    state[name][:, cols] = 0
            if self.frozen[key] == layer.rank:
                self._release(layer, optimizer)

    def _release(self, layer: LowDimLinear, optimizer) -> None:
        b = layer.lora_B
        b.requires_grad_(False)
        b.grad = None
        if optimizer is not None:
            optimizer.state.pop(b, None)
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p is not b]
        self.snapshots.pop(id(layer), None)

    def all_frozen(self) -> bool:
        return all(not layer.lora_B.requires_grad for layer in self.layers)
