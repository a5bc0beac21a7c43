"""A linear layer whose trainable part is a set of b×b weight blocks.

    y = x · (W + Σᵢ Eᵣᵢ Dᵢ Fᶜᵢᵀ)ᵀ + b      (Dᵢ: zero-initialised fp32 update of block i = (row block rᵢ, col block cᵢ))

All blocks are handled at once with batched matmuls over gathered column blocks and an index_add into row blocks:
no per-block Python loop, in the forward or the backward. The backward gives the dense input gradient and gradients
for the selected blocks only, and saves a *copy* of just the input column blocks that selected blocks read.

Dimensions that are not multiples of b are tiled with ragged edge blocks (as if zero-padded to a multiple of b); the
padded part of an edge block never reaches the output and gets zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from subtune.core.deltas import Delta
from subtune.core.errors import SelectionError
from subtune.ops.base import WrappedLinear, master_dtype


def num_blocks(size: int, block: int) -> int:
    return -(-size // block)


def _pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    return t if t.shape[-1] == size else F.pad(t, (0, size - t.shape[-1]))


class _BlockDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, delta, rows, col_pos, used_cols, block):
        out_features, in_features = weight.shape
        n_row_blocks, n_col_blocks = num_blocks(out_features, block), num_blocks(in_features, block)
        y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        flat = x.reshape(-1, in_features)
        # a copy of the column blocks the selected blocks read (never a view of x)
        x_used = _pad_last(flat, n_col_blocks * block).view(-1, n_col_blocks, block).index_select(1, used_cols)
        x_sel = x_used.index_select(1, col_pos)  # (N, k, b): the input of each selected block
        contrib = torch.einsum("nkc,kbc->nkb", x_sel, delta.to(x.dtype))
        y_rows = torch.zeros(flat.shape[0], n_row_blocks, block, dtype=y.dtype, device=y.device)
        y_rows.index_add_(1, rows, contrib)
        y = y + y_rows.view(flat.shape[0], -1)[:, :out_features].view(y.shape)
        ctx.save_for_backward(x_used, weight, delta, rows, col_pos, used_cols)
        ctx.block, ctx.in_features = block, in_features
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_used, weight, delta, rows, col_pos, used_cols = ctx.saved_tensors
        block, in_features = ctx.block, ctx.in_features
        out_features = weight.shape[0]
        n_row_blocks, n_col_blocks = num_blocks(out_features, block), num_blocks(in_features, block)
        g = grad_y.reshape(-1, out_features)
        g_sel = _pad_last(g, n_row_blocks * block).view(-1, n_row_blocks, block).index_select(1, rows)  # (N, k, b)
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            back = torch.einsum("nkb,kbc->nkc", g_sel, delta.to(g.dtype))  # each block's input gradient
            cols = used_cols.index_select(0, col_pos)
            x_cols = torch.zeros(g.shape[0], n_col_blocks, block, dtype=g.dtype, device=g.device)
            x_cols.index_add_(1, cols, back)
            grad_x = g.matmul(weight.to(g.dtype)) + x_cols.view(g.shape[0], -1)[:, :in_features]
            grad_x = grad_x.view(*grad_y.shape[:-1], in_features)
        if ctx.needs_input_grad[3]:
            x_sel = x_used.index_select(1, col_pos).to(g.dtype)
            grad_delta = torch.einsum("nkb,nkc->kbc", g_sel, x_sel).to(delta.dtype)
        return grad_x, None, None, grad_delta, None, None, None, None


class BlockDeltaLinear(WrappedLinear):
    """Wraps a frozen nn.Linear and trains a zero-initialised fp32 update of the given (row, col) blocks.

    Its update is `Delta.blocks`; `merge()` (from WrappedLinear) keeps only the original entries of the selected
    blocks (inside the matrix), so `unmerge()` restores the base bit for bit, even in bf16.
    """

    def __init__(self, base_layer: nn.Linear, rows: torch.Tensor, cols: torch.Tensor, block_size: int,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.block_size = block_size
        device = base_layer.weight.device
        rows = torch.as_tensor(rows, dtype=torch.long, device=device)
        cols = torch.as_tensor(cols, dtype=torch.long, device=device)
        n_r, n_c = num_blocks(base_layer.out_features, block_size), num_blocks(base_layer.in_features, block_size)
        if rows.numel() == 0 or rows.shape != cols.shape:
            raise SelectionError("block rows and cols must be non-empty and of equal length;"
                                 " the selection does not fit this layer: select again on this model")
        if rows.min() < 0 or rows.max() >= n_r or cols.min() < 0 or cols.max() >= n_c:
            raise SelectionError(f"block indices out of range for a {n_r}×{n_c} block grid;"
                                 " the selection does not fit this layer: select again on this model")
        if torch.unique(rows * n_c + cols).numel() != rows.numel():
            raise SelectionError("a block is selected twice;"
                                 " the selection does not fit this layer: select again on this model")
        used_cols, col_pos = torch.unique(cols, return_inverse=True)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.register_buffer("used_cols", used_cols, persistent=False)
        self.register_buffer("col_pos", col_pos, persistent=False)
        dtype = dtype or master_dtype(base_layer.weight.dtype)
        self.delta = nn.Parameter(torch.zeros(rows.numel(), block_size, block_size, dtype=dtype, device=device))

    def trainable_values(self) -> int:
        """Real (unpadded) entries of the selected blocks."""
        b = self.block_size
        heights = (self.out_features - self.rows * b).clamp(max=b)
        widths = (self.in_features - self.cols * b).clamp(max=b)
        return int((heights * widths).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return _BlockDelta.apply(x, self.base_layer.weight, self.base_layer.bias, self.delta, self.rows,
                                 self.col_pos, self.used_cols, self.block_size)

    def as_delta(self) -> Delta:
        """blocks(rows, cols, block_size, delta); its values are the trainable `delta`, detached (shared)."""
        return Delta.blocks(self.rows, self.cols, self.block_size, self.delta, (self.out_features, self.in_features))

    def dense_delta(self) -> torch.Tensor:
        """The update as a full (out, in) matrix in the delta's dtype."""
        return self.as_delta().to_dense(self.delta.dtype)

    def _grid(self, matrix: torch.Tensor) -> torch.Tensor:
        """(out, in) -> padded (R, C, b, b) copy: a weight-shaped tensor (a dense gradient) as blocks, for tests."""
        b = self.block_size
        n_r, n_c = num_blocks(self.out_features, b), num_blocks(self.in_features, b)
        padded = F.pad(matrix, (0, n_c * b - matrix.shape[1], 0, n_r * b - matrix.shape[0]))
        return padded.view(n_r, b, n_c, b).permute(0, 2, 1, 3).contiguous()

    def extra_repr(self) -> str:
        return f"blocks={self.rows.numel()}, block_size={self.block_size}, in={self.in_features}, out={self.out_features}"
