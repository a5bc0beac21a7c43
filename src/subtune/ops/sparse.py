"""Dense-and-sparse linear: y = x · Dᵀ + x · Sᵀ, D frozen (optionally 4-bit NF4), S a few fp32 values at fixed positions.

The positions of S are zeroed in W *before* D is built (and quantised), so no weight is counted twice; NF4 has an
exact zero code, so dequant(D) is exactly 0 there. Zeroth-order training perturbs and updates only S's values and
never touches D's packed codes. The sparse term costs O(tokens · k): a gather of input columns and an index_add
into output rows.

The 4-bit layout is kept fixed. On a CPU with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight on the first
eval-mode no-grad forward (every ZO step, every eval) into a CPU-only layout with bf16 block scales; from then on it
computes in bf16 even for an fp32 base (too coarse for SPSA's L+ − L−), the repack fails unless in_features is a
multiple of 64 and out_features of 32, and `state_dict()` converts it back in place, re-quantising the scales. We
switch the repack off per layer: the standard layout is what CUDA and every other CPU run, costs one dequantisation
per forward (0.33 ms for 1024×1024, 1.4% of an fp32 forward over 2,048 tokens on 2 cores), works for any width, and
merges exactly. `dequantized_weight` still reads a layer that bitsandbytes did repack.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from subtune.core.config import ConfigError
from subtune.core.deltas import Delta
from subtune.core.errors import SelectionError
from subtune.ops.base import WrappedLinear


def quantize_nf4(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    from subtune.core.notices import release_4bit_notice

    release_4bit_notice()  # bitsandbytes' import-time CPU-kernel note matters now (core/notices.py)

    out_f, in_f = weight.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, quant_type="nf4", compute_dtype=compute_dtype,
                              device="cpu")
    layer.support_avx512bf16_for_cpu = False  # keep the standard layout (module docstring)
    layer.weight = bnb.nn.Params4bit(weight.detach().to("cpu", torch.float32).contiguous(), requires_grad=False,
                                     quant_type="nf4")
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to("cpu", compute_dtype).clone(), requires_grad=False)
    return layer.to(weight.device)  # quantises on .to()


def dequantized_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense (out, in) weight `layer` computes with, in `dtype` (default: its compute dtype, as its forward uses).

    For a 4-bit layer this is bitsandbytes' own dequantisation, also when bitsandbytes has repacked the weight into
    its CPU layout (then: the same codes with the bf16 block scales that layout keeps)."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        w = weight.detach()
        return w if dtype is None else w.to(dtype)
    import bitsandbytes.functional as bf

    data = weight.data
    if getattr(state, "packing_format_for_cpu", False):
        data, state = _standard_layout(data, state)
    state = copy.copy(state)  # never change the layer's own state
    state.dtype = dtype or getattr(layer, "compute_dtype", None) or state.dtype
    return bf.dequantize_4bit(data, state)


def _standard_layout(packed: torch.Tensor, state):
    """Codes and block scales of a weight bitsandbytes repacked for its CPU kernel, in the standard 4-bit layout.

    The code permutation is undone by bitsandbytes' own inverse (on a copy of the state, and without its lossy
    re-quantisation of the scales); the scales are the bf16 ones the repacked layer computes with."""
    import bitsandbytes.functional as bf

    scratch = copy.copy(state)
    scratch.original_nested = False
    codes, _ = bf._convert_weight_packed_for_cpu_inverse(packed, scratch)
    absmax = state.absmax.T.reshape(-1).float()  # repacked: (in/blocksize, out) bf16 -> the standard block order
    standard = bf.QuantState(absmax=absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                             quant_type=state.quant_type, dtype=state.original_dtype)
    return codes, standard


class DenseAndSparseLinear(WrappedLinear):
    def __init__(self, base_layer: nn.Linear, flat_index: torch.Tensor, quantize: str = "none"):
        super().__init__()
        out_f, in_f = base_layer.out_features, base_layer.in_features
        device = base_layer.weight.device
        flat_index = torch.as_tensor(flat_index, dtype=torch.long, device=device).sort().values
        if flat_index.numel() == 0 or flat_index[0] < 0 or flat_index[-1] >= out_f * in_f:
            raise SelectionError(f"sparse positions must be non-empty and lie in [0, {out_f * in_f}); the selection "
                                 "does not fit this layer: select again on this model")
        if bool((flat_index[1:] == flat_index[:-1]).any()):
            raise SelectionError("sparse positions must be distinct (a repeated one would be counted twice); "
                                 "the selection does not fit this layer: select again on this model")
        self.register_buffer("rows", flat_index // in_f, persistent=False)
        self.register_buffer("cols", flat_index % in_f, persistent=False)
        weight = base_layer.weight.detach()
        self.values = nn.Parameter(weight.reshape(-1)[flat_index].float().clone())
        # the plain base's entries at the positions, before any training: what the update is measured from. A plain
        # attribute (not a buffer), so a later cast of the model to bf16 cannot round it
        self.original_values = self.values.detach().clone()
        dense = weight.clone()
        dense.view(-1)[flat_index] = 0
        if quantize == "nf4":
            self.dense = quantize_nf4(dense, base_layer.bias, compute_dtype=weight.dtype)
        elif quantize == "none":
            self.dense = nn.Linear(in_f, out_f, bias=base_layer.bias is not None, device=device, dtype=weight.dtype)
            with torch.no_grad():
                self.dense.weight.copy_(dense)
                if base_layer.bias is not None:
                    self.dense.bias.copy_(base_layer.bias)
        else:
            raise ConfigError(f"quantize must be 'nf4' or 'none', got {quantize!r}; pick one of them")
        self.dense.requires_grad_(False)
        self.quantize = quantize
        self._merged: nn.Linear | None = None
        self._dense_cache: torch.Tensor | None = None  # dequant(D) + S, while cache_dense(True) (ZO training)

    @property
    def base_layer(self) -> nn.Module:
        return self._merged if self._merged is not None else self.dense

    @property
    def merged(self) -> bool:
        return self._merged is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self._merged(x)
        if self._dense_cache is not None and not torch.is_grad_enabled():
            w = self._dense_cache  # D is exactly 0 at the sparse positions: writing S there gives dequant(D) + S
            w.view(-1).index_copy_(0, self.rows * self.in_features + self.cols, self.values.detach().to(w.dtype))
            return nn.functional.linear(x.to(w.dtype), w, self.dense.bias).to(x.dtype)
        y = self.dense(x)
        contrib = x.index_select(-1, self.cols) * self.values.to(x.dtype)
        return y.index_add(-1, self.rows, contrib.to(y.dtype))

    def as_delta(self) -> Delta:
        """sparse(positions, values − the plain base's entries there), in float64 so that original + delta gives the
        trained fp32 values back exactly. On a 4-bit base this is the update against the full-precision base
        (docs/FORMAT.md): the NF4 rounding of the other weights is not part of it."""
        values = self.values.detach()
        original = self.original_values.to(values.device)
        return Delta.sparse(self.rows * self.in_features + self.cols, values.double() - original.double(),
                            (self.out_features, self.in_features))

    @torch.no_grad()
    def restore_delta(self, delta: Delta) -> None:
        """Set the values to original + `delta.values` (the inverse of `as_delta`; same positions assumed)."""
        original = self.original_values.to(self.values.device, torch.float64)
        self.values.copy_(original + delta.values.to(original.device, torch.float64))

    def effective_weight(self) -> torch.Tensor:
        """dequant(D) + S as a dense (out, in) matrix in the dense part's compute dtype (what its forward uses)."""
        w = dequantized_weight(self.dense).clone()
        w.view(-1).index_put_((self.rows * self.in_features + self.cols,), self.values.detach().to(w.dtype))
        return w

    @torch.no_grad()
    def merge(self) -> None:
        """A plain 16/32-bit Linear holding dequant(D) + S: exactly the model that was trained."""
        if self.merged:
            return
        w = self.effective_weight()
        merged = nn.Linear(self.in_features, self.out_features, bias=self.dense.bias is not None, device=w.device,
                           dtype=w.dtype)
        merged.weight.copy_(w)
        if self.dense.bias is not None:
            merged.bias.copy_(self.dense.bias)
        self._merged = merged.requires_grad_(False)

    def unmerge(self) -> None:
        self._merged = None

    @torch.no_grad()
    def cache_dense(self, on: bool) -> int:
        """Keep dequant(D) + S as one dense weight in the compute dtype (`on`), so no-grad forwards (ZO probes,
        evaluation) run one plain matmul: no dequantisation, no sparse gather/scatter, the merged model's exact
        computation. Costs one dense compute-dtype copy of the weight (for NF4, 8x its 4-bit codes in fp32): the
        returned bytes. `on=False` frees it."""
        if not on:
            self._dense_cache = None
            return 0
        if self._dense_cache is None:
            self._dense_cache = dequantized_weight(self.dense).clone()
        return self._dense_cache.numel() * self._dense_cache.element_size()

    def unloaded(self) -> nn.Module:
        self.merge()
        return self._merged

    def extra_repr(self) -> str:
        return f"sparse={self.values.numel()}, dense={self.quantize}, in={self.in_features}, out={self.out_features}"
