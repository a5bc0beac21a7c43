"""A linear layer with a low-dimensional adapter: y = W x + s · B S A x.

A (r × in) is a frozen buffer, S (r × r) trains, B (out × r) trains until it is frozen. Because A never needs a
gradient, autograd keeps only r-dimensional activations for the adapter (h = A x for ∂S, u = S h for ∂B) and never
the layer's full input; once B is frozen, u is not kept either. Plain autograd does this (verified by a test with
saved-tensor hooks), so no custom Function is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from subtune.core.deltas import Delta
from subtune.core.errors import SelectionError
from subtune.ops.base import WrappedLinear, master_dtype


class LowDimLinear(WrappedLinear):
    def __init__(self, base_layer: nn.Linear, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, scaling: float):
        super().__init__()
        rank = s.shape[0]
        if a.shape != (rank, base_layer.in_features) or b.shape != (base_layer.out_features, rank) or \
                s.shape != (rank, rank):
            raise SelectionError(f"shapes A {tuple(a.shape)}, B {tuple(b.shape)}, S {tuple(s.shape)} do not fit a "
                                 f"{base_layer.out_features}×{base_layer.in_features} layer at rank {rank}; the "
                                 "selection does not fit this layer: select again on this model")
        dtype = master_dtype(base_layer.weight.dtype)
        device = base_layer.weight.device
        self.base_layer = base_layer
        self.register_buffer("lora_A", a.to(device, dtype).contiguous())  # frozen projection (PMA)
        self.lora_S = nn.Parameter(s.to(device, dtype).clone())  # trainable core (LDA)
        self.lora_B = nn.Parameter(b.to(device, dtype).clone())  # trained, then gradually frozen (PMB)
        self.scaling = float(scaling)

    @property
    def rank(self) -> int:
        return self.lora_S.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        dtype = self.lora_S.dtype
        h = F.linear(x.to(dtype), self.lora_A)
        u = F.linear(h, self.lora_S)
        return y + (F.linear(u, self.lora_B) * self.scaling).to(y.dtype)

    def as_delta(self) -> Delta:
        """lowrank(A, B S, scaling): this layer's own term s · B S A, detached.

        A is shared with the buffer; B S is a fresh product. With a residual init (the base already holds
        W − s · B₀ S₀ A) this is still only the layer's own term: the method subtracts B₀ S₀ for the adapter record.
        Merging it keeps a copy of the whole weight (the only way to unmerge bit for bit).
        """
        return Delta.lowrank(self.lora_A, self.lora_B.detach() @ self.lora_S.detach(), self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """s · B S A as an (out, in) matrix, in the master dtype."""
        return self.as_delta().to_dense()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, in={self.in_features}, out={self.out_features}"
