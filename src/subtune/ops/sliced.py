"""Linear layers whose trainable part is a slice of the weight: some input columns or some output rows.

    y = x · (W + P Δ)ᵀ + b        (Δ is the zero-initialised fp32 update of the slice, P places it)

Partial back-propagation: the frozen W gets no gradient, the input gradient is dense, and the weight gradient is
computed for the slice only. For an input-column slice the op saves a *copy* of x[..., S] (never a view, which would
keep all of x alive); an output-row slice needs all of x for its gradient and saves it.

This module knows nothing about heads, channels or how the slice was chosen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from subtune.core.deltas import Delta
from subtune.core.errors import SelectionError
from subtune.ops.base import WrappedLinear, master_dtype  # noqa: F401 (re-exported)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _InputColumnDelta(torch.autograd.Function):
    """y = x Wᵀ + b + x[..., S] Δᵀ, with Δ of shape (out, |S|)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, index):
        x_slice = x.index_select(-1, index)  # a gather: a new tensor, not a view of x
        y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        y = y + F.linear(x_slice, delta.to(x.dtype))
        ctx.save_for_backward(x_slice, weight, delta, index)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_slice, weight, delta, index = ctx.saved_tensors
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y.matmul(weight.to(grad_y.dtype))
            grad_x.index_add_(-1, index, grad_y.matmul(delta.to(grad_y.dtype)))
        if ctx.needs_input_grad[3]:
            grad_delta = _flat(grad_y).t().matmul(_flat(x_slice).to(grad_y.dtype)).to(delta.dtype)
        return grad_x, None, None, grad_delta, None


class _OutputRowDelta(torch.autograd.Function):
    """y = x Wᵀ + b, then y[..., R] += x Δᵀ, with Δ of shape (|R|, in)."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, index):
        y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        y.index_add_(-1, index, F.linear(x, delta.to(x.dtype)))
        ctx.save_for_backward(x, weight, delta, index)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, delta, index = ctx.saved_tensors
        grad_rows = grad_y.index_select(-1, index)
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y.matmul(weight.to(grad_y.dtype)) + grad_rows.matmul(delta.to(grad_y.dtype))
        if ctx.needs_input_grad[3]:
            grad_delta = _flat(grad_rows).t().matmul(_flat(x).to(grad_y.dtype)).to(delta.dtype)
        return grad_x, None, None, grad_delta, None


INPUT_COLUMNS, OUTPUT_ROWS = "input_columns", "output_rows"

_OPS = {INPUT_COLUMNS: _InputColumnDelta, OUTPUT_ROWS: _OutputRowDelta}


def sliced_delta_linear(x, weight, bias, delta, index, kind: str):
    return _OPS[kind].apply(x, weight, bias, delta, index)


class SlicedDeltaLinear(WrappedLinear):
    """Wraps a frozen nn.Linear; trains an fp32 delta on the given input columns or output rows.

    Its update is `Delta.columns` / `Delta.rows`; `merge()` (from WrappedLinear) adds it into the base weight's slice
    and keeps the original slice, so `unmerge()` restores it bit for bit, even in bf16.
    """

    def __init__(self, base_layer: nn.Linear, index: torch.Tensor, kind: str, dtype: torch.dtype | None = None):
        super().__init__()
        if kind not in _OPS:
            raise SelectionError(f"kind must be one of {list(_OPS)}, got {kind!r}; pass INPUT_COLUMNS or OUTPUT_ROWS")
        self.base_layer = base_layer
        self.kind = kind
        index = torch.as_tensor(index, dtype=torch.long, device=base_layer.weight.device).sort().values
        limit = base_layer.in_features if kind == INPUT_COLUMNS else base_layer.out_features
        if index.numel() == 0 or index[0] < 0 or index[-1] >= limit or index.unique().numel() != index.numel():
            raise SelectionError(f"index must hold distinct values in [0, {limit}), got {index.numel()} values; "
                                 "the selection does not fit this layer: select again on this model")
        self.register_buffer("index", index, persistent=False)
        shape = (base_layer.out_features, index.numel()) if kind == INPUT_COLUMNS else (index.numel(),
                                                                                       base_layer.in_features)
        dtype = dtype or master_dtype(base_layer.weight.dtype)
        self.delta = nn.Parameter(torch.zeros(shape, dtype=dtype, device=base_layer.weight.device))

    @property
    def slice_dim(self) -> int:
        return 1 if self.kind == INPUT_COLUMNS else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return sliced_delta_linear(x, self.base_layer.weight, self.base_layer.bias, self.delta, self.index, self.kind)

    def as_delta(self) -> Delta:
        """columns(index, delta) or rows(index, delta); its values are the trainable `delta`, detached (shared)."""
        make = Delta.columns if self.kind == INPUT_COLUMNS else Delta.rows
        return make(self.index, self.delta, (self.out_features, self.in_features))

    def dense_delta(self) -> torch.Tensor:
        """The update as a full (out, in) matrix in the delta's dtype (for tests and export)."""
        return self.as_delta().to_dense(self.delta.dtype)

    def extra_repr(self) -> str:
        return f"{self.kind}={self.index.numel()}, in={self.in_features}, out={self.out_features}"
