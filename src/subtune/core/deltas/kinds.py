"""The method-neutral update record: what an adapter changes in one linear layer of the base model.

A `Delta` states the trained update ΔW of one target module in the base weight's own (out, in) coordinates, as one
of six kinds (built with the `Delta.<kind>(...)` constructors):

    columns(index, values, shape)   values (out, |S|) added to W[:, S]            S²FT O / Down input columns
    rows(index, values, shape)      values (|S|, in) added to W[S, :]             S²FT V / Up output rows
    blocks(row_blocks, col_blocks, block_size, values, shape)
                                    values (k, b, b); block i is added at rows rᵢ·b … rᵢ·b+b−1,
                                    columns cᵢ·b … cᵢ·b+b−1                        SMT
    sparse(flat_index, values, shape)  values (k,) added at W.view(-1)[flat_index]   SensZOQ
    lowrank(A, B, scale)            scale · B @ A with A (r, in), B (out, r)       LaMDA, LoRA
    dense(values)                   values (out, in)                               full, MeZO

Why one small class per kind: each kind's math (dense form, forward, merge/unmerge, exact LoRA factors, union) sits
in one short place, and the generic code (save, load, merge, export, fusion, serving) calls the same methods on any
kind without knowing which training method produced it. Deltas are values: no operation changes a delta (`scaled`,
`+` and `to` return new ones, possibly sharing tensors). A delta built from live parameters shares their storage
(detached, no autograd); clone them first if they keep training.

Edge blocks: as in `ops/block_sparse.py`, a matrix whose size is not a multiple of b is tiled as if zero-padded to
one, and every block stores its full b×b values; the entries of an edge block that fall outside the matrix are
padding that no operation reads (they never reach `to_dense`, `apply`, a merge, an export or a sparse form).

dtypes: values keep their dtype (fp32 masters normally; bf16 or float64 work too). Dense forms and LoRA factors
are computed in the "compute dtype", the values' dtype promoted to at least fp32. `apply` computes in x's dtype
(as the training layers in `ops/` do) and adds into y's. `merge_into` adds in the promoted dtype of weight and
update and rounds once to the weight's dtype; `unmerge_from` then restores the weight bit for bit from the saved
original entries (only the touched ones for columns/rows/blocks/sparse).

Adding two deltas of one module (fusion): the same kind keeps its kind (union of indices, overlapping entries
summed; blocks need equal block sizes; lowrank concatenates the factors). Mixed columns/rows/blocks/sparse give a
`sparse` delta (still only the touched entries); any other mix gives a `dense` delta.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Mapping

import torch
import torch.nn.functional as F

from subtune.core.errors import AdapterLoadError, ExportError, SubtuneError


class DeltaError(SubtuneError, ValueError):
    """A delta's parts do not fit each other, or a delta does not fit the weight or the other delta it meets."""


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """At least fp32: bf16/fp16 sums and factors round away small updates."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def _num_blocks(size: int, block: int) -> int:
    return -(-size // block)


# ----------------------------------------------------------------------------------------------- checks on build
def _check_shape(shape) -> tuple[int, int]:
    shape = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else ()
    if len(shape) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise DeltaError(f"shape must be two positive ints (out_features, in_features), got {shape!r}")
    return shape


def _check_integer_vector(index, name: str, device: torch.device) -> torch.Tensor:
    index = torch.as_tensor(index)
    if index.dim() != 1 or index.numel() == 0:  # before the dtype: torch.as_tensor([]) is float
        raise DeltaError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(index.shape)} (a module with "
                         "nothing selected has no delta: leave it out)")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise DeltaError(f"{name} must be an integer tensor, got {index.dtype}")
    return index.to(device=device, dtype=torch.long)


def _check_index(index, name: str, limit: int, device: torch.device) -> torch.Tensor:
    """A 1-D, non-empty, duplicate-free integer index inside [0, limit), as int64 on `device`."""
    index = _check_integer_vector(index, name, device)
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= limit:
        raise DeltaError(f"{name} must lie in [0, {limit}), got values in [{low}, {high}]")
    if torch.unique(index).numel() != index.numel():
        raise DeltaError(f"{name} holds a position twice; each position may appear once")
    return index


def _check_values(values, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise DeltaError(f"{name} must be a floating-point tensor, got "
                         f"{values.dtype if isinstance(values, torch.Tensor) else type(values).__name__}")
    if tuple(values.shape) != tuple(shape):
        raise DeltaError(f"{name} must have shape {tuple(shape)}, got {tuple(values.shape)}")
    return values.detach()


def _check_scale(scale, name: str = "scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise DeltaError(f"{name} must be a finite number, got {scale!r}")
    return float(scale)


def _one_hot(index: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """(len(index), size) with a single 1 per row at index[i]: a selection factor that multiplies exactly."""
    out = torch.zeros(index.numel(), size, dtype=dtype, device=index.device)
    out[torch.arange(index.numel(), device=index.device), index] = 1
    return out


def _union(index_a: torch.Tensor, values_a: torch.Tensor, index_b: torch.Tensor, values_b: torch.Tensor,
           dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted union of two indices, with the values placed along `dim` and summed where they overlap."""
    index_b, values_b = index_b.to(index_a.device), values_b.to(values_a.device)
    index = torch.unique(torch.cat([index_a, index_b]))
    dtype = torch.promote_types(values_a.dtype, values_b.dtype)
    shape = list(values_a.shape)
    shape[dim] = index.numel()
    values = torch.zeros(shape, dtype=dtype, device=values_a.device)
    for idx, vals in ((index_a, values_a), (index_b, values_b)):
        values.index_add_(dim, torch.searchsorted(index, idx), vals.to(dtype))
    return index, values


# ------------------------------------------------------------------------------------------------------ the base
class Delta(ABC):
    """The update of one module. Subclasses define the per-kind math; see the module docstring for the kinds."""

    kind: str = ""
    tensor_fields: tuple[str, ...] = ()  # constructor arguments stored as tensors in a file
    meta_fields: tuple[str, ...] = ()  # constructor arguments stored in the JSON meta
    shape: tuple[int, int]

    # -- constructors, one per kind
    @staticmethod
    def columns(index, values: torch.Tensor, shape) -> ColumnsDelta:
        return ColumnsDelta(index, values, shape)

    @staticmethod
    def rows(index, values: torch.Tensor, shape) -> RowsDelta:
        return RowsDelta(index, values, shape)

    @staticmethod
    def blocks(row_blocks, col_blocks, block_size: int, values: torch.Tensor, shape) -> BlocksDelta:
        return BlocksDelta(row_blocks, col_blocks, block_size, values, shape)

    @staticmethod
    def sparse(flat_index, values: torch.Tensor, shape) -> SparseDelta:
        return SparseDelta(flat_index, values, shape)

    @staticmethod
    def lowrank(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> LowRankDelta:
        return LowRankDelta(A, B, scale)

    @staticmethod
    def dense(values: torch.Tensor) -> DenseDelta:
        return DenseDelta(values)

    # -- what every kind shares
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.tensor_fields}

    @property
    def device(self) -> torch.device:
        return next(iter(self._tensors().values())).device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of dense forms and LoRA factors: the values' dtype, at least fp32."""
        return _compute_dtype(*(t.dtype for t in self._tensors().values() if t.is_floating_point()))

    @property
    def num_values(self) -> int:
        """Stored floating-point values (edge-block padding included)."""
        return sum(t.numel() for t in self._tensors().values() if t.is_floating_point())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def _rebuild(self, **changes) -> Delta:
        args = {name: getattr(self, name) for name in self.tensor_fields + self.meta_fields}
        args.update(changes)
        return type(self)(**args, shape=self.shape)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Delta:
        """A copy on `device`; `dtype` casts the floating-point values (indices stay int64)."""
        return self._rebuild(**{name: t.to(device=device, dtype=dtype if t.is_floating_point() else None)
                                for name, t in self._tensors().items()})

    def __repr__(self) -> str:
        parts = [f"{n}={tuple(t.shape)}" for n, t in self._tensors().items()]
        parts += [f"{n}={getattr(self, n)!r}" for n in self.meta_fields]
        return f"Delta.{self.kind}(shape={self.shape}, {', '.join(parts)})"

    # -- per kind
    @abstractmethod
    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) update to add to the module's weight, in `dtype` (default: the compute dtype)."""

    @abstractmethod
    def _apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _merge(self, weight: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _unmerge(self, weight: torch.Tensor, saved: torch.Tensor) -> None: ...

    @abstractmethod
    def _saved_shape(self) -> tuple[int, ...]: ...

    def _touched(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted output rows and input columns the update can be non-zero in (all of them by default)."""
        return torch.arange(self.shape[0], device=self.device), torch.arange(self.shape[1], device=self.device)

    @abstractmethod
    def _same_kind_sum(self, other: Delta) -> Delta: ...

    # -- the forward
    def apply(self, x: torch.Tensor, y: torch.Tensor, batch_rows: torch.Tensor | None = None) -> torch.Tensor:
        """y + delta(x) for x (..., in) and y (..., out), out of place; touches only what the kind selects.

        `batch_rows` (indices into the leading dim) adds the update to those batch rows only, for batched serving
        where each request has its own adapter.
        """
        if x.shape[-1] != self.shape[1] or y.shape[-1] != self.shape[0] or x.shape[:-1] != y.shape[:-1]:
            raise DeltaError(f"apply needs x (..., {self.shape[1]}) and y (..., {self.shape[0]}) with equal leading "
                             f"dims, got x {tuple(x.shape)} and y {tuple(y.shape)}")
        if batch_rows is None:
            return self._apply(x, y)
        batch_rows = torch.as_tensor(batch_rows, dtype=torch.long, device=y.device)
        part = self._apply(x.index_select(0, batch_rows.to(x.device)), y.index_select(0, batch_rows))
        return y.index_copy(0, batch_rows, part)

    # -- merge and exact unmerge
    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        """Add the update to `weight` (out, in) in place, rounded once to its dtype; returns the original entries
        that `unmerge_from` needs (only the touched ones for the sparse kinds)."""
        if tuple(weight.shape) != self.shape:
            raise DeltaError(f"cannot merge a {self.kind} delta of shape {self.shape} into a weight of shape "
                             f"{tuple(weight.shape)}; pass the weight of the module the delta belongs to")
        return self._merge(weight)

    @torch.no_grad()
    def unmerge_from(self, weight: torch.Tensor, saved: torch.Tensor) -> None:
        """Restore `weight` bit for bit from what `merge_into` returned."""
        if tuple(weight.shape) != self.shape:
            raise DeltaError(f"cannot unmerge a {self.kind} delta of shape {self.shape} from a weight of shape "
                             f"{tuple(weight.shape)}; pass the weight it was merged into")
        if tuple(saved.shape) != self._saved_shape() or saved.dtype != weight.dtype:
            raise DeltaError(f"the saved entries ({tuple(saved.shape)}, {saved.dtype}) are not what this delta's "
                             f"merge_into returned ({self._saved_shape()}, {weight.dtype}); pass that exact tensor")
        self._unmerge(weight, saved.to(weight.device))

    # -- LoRA export
    def exact_lora_rank(self) -> int:
        """The rank of the exact LoRA factors `to_lora` gives when allowed."""
        touched_rows, touched_cols = self._touched()
        return min(touched_rows.numel(), touched_cols.numel())

    def _exact_lora(self) -> tuple[torch.Tensor, torch.Tensor, float, str]:
        """One-hot factors over the fewer of the touched rows or columns: B @ A equals the update exactly."""
        touched_rows, touched_cols = self._touched()
        dtype = self.compute_dtype
        full = self.to_dense(dtype)
        if touched_cols.numel() <= touched_rows.numel():  # A picks the columns, B holds them
            return _one_hot(touched_cols, self.shape[1], dtype), full[:, touched_cols].contiguous(), 1.0, \
                "one-hot columns"
        b = _one_hot(touched_rows, self.shape[0], dtype).t().contiguous()  # B places the rows, A holds them
        return full[touched_rows].contiguous(), b, 1.0, "one-hot rows"

    def to_lora(self, max_rank: int, fallback: str = "error", name: str = "delta"
                ) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
        """(A (r, in), B (out, r), scale, info) with scale · B @ A the update.

        Exact when `exact_lora_rank()` <= max_rank (info["exact"] True, info["error"] 0.0). Otherwise fallback
        "error" raises ExportError naming the rank needed, and "svd" returns the best rank-max_rank approximation
        with info["error"] its relative Frobenius error. `name` (the module path) is used in messages.
        """
        if fallback not in ("error", "svd"):
            raise ExportError(f"fallback must be 'error' or 'svd', got {fallback!r}")
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise ExportError(f"max_rank must be a positive int, got {max_rank!r}")
        rank = self.exact_lora_rank()
        if rank <= max_rank:
            a, b, scale, how = self._exact_lora()
            return a, b, scale, {"rank": int(a.shape[0]), "exact": True, "error": 0.0, "how": how}
        if fallback == "error":
            raise ExportError(
                f"{name}: its {self.kind} update needs LoRA rank {rank}, above max_rank={max_rank}; raise max_rank "
                "(vLLM accepts at most 512), export a merged model with subtune.merge(), or pass fallback='svd' for "
                "an approximate export")
        return self._svd_lora(max_rank, rank)

    def _svd_lora(self, max_rank: int, exact_rank: int) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
        full = self.to_dense(torch.float64)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        k = min(max_rank, s.numel())
        dtype = self.compute_dtype
        b, a = (u[:, :k] * s[:k]).to(dtype).contiguous(), vh[:k].to(dtype).contiguous()
        # the error of the factors as returned (after the cast), so it is the real error of what the caller gets
        error = torch.linalg.norm(full - b.double() @ a.double()) / torch.linalg.norm(full).clamp_min(1e-300)
        return a, b, 1.0, {"rank": k, "exact": False, "error": float(error), "how": "svd", "exact_rank": exact_rank}

    # -- fusion
    def scaled(self, weight: float) -> Delta:
        """The update times `weight`."""
        weight = _check_scale(weight, "weight")
        return self._rebuild(values=self.values * weight)

    def __add__(self, other: Delta) -> Delta:
        """The sum of two updates of one module (see the module docstring for the resulting kind)."""
        if not isinstance(other, Delta):
            return NotImplemented
        if other.shape != self.shape:
            raise DeltaError(f"cannot add a {other.kind} delta of shape {other.shape} to a {self.kind} delta of shape "
                             f"{self.shape}; only deltas of the same module add up")
        if other.kind == self.kind:
            return self._same_kind_sum(other)
        if isinstance(self, _SupportDelta) and isinstance(other, _SupportDelta):
            return self.to_sparse() + other.to_sparse()
        dtype = torch.promote_types(self.compute_dtype, other.compute_dtype)
        return DenseDelta(self.to_dense(dtype) + other.to_dense(dtype).to(self.device))

    # -- serialisation
    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """{f"{prefix}.{field}": tensor}: the indices and values, ready for safetensors."""
        return {f"{prefix}.{name}": t.contiguous() for name, t in self._tensors().items()}

    def meta(self) -> dict:
        """The JSON-able rest: kind, shape and the kind's numbers (block_size, scale)."""
        return {"kind": self.kind, "shape": list(self.shape), **{n: getattr(self, n) for n in self.meta_fields}}

    @staticmethod
    def from_tensors(prefix: str, tensors: Mapping[str, torch.Tensor], meta: Mapping,
                     check_finite: bool = True) -> Delta:
        """Read back what `to_tensors(prefix)` and `meta()` wrote, checking kind, shapes, index ranges, dtypes and
        (unless check_finite=False) finiteness; a bad part raises AdapterLoadError naming the module and the fix."""
        return _read_delta(prefix, tensors, meta, check_finite)


# ------------------------------------------------------------------------------- columns, rows, blocks, sparse
class _SupportDelta(Delta):
    """Kinds whose update lives on a set of weight entries: they share the coordinate form and merge by entries."""

    @abstractmethod
    def coords(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, col, value) of every stored entry inside the matrix, flat."""

    def to_sparse(self) -> SparseDelta:
        rows, cols, vals = self.coords()
        return SparseDelta(rows * self.shape[1] + cols, vals, self.shape)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        rows, cols, vals = self.coords()
        dtype = dtype or self.compute_dtype
        full = torch.zeros(self.shape, dtype=dtype, device=vals.device)
        return full.index_put_((rows, cols), vals.to(dtype))

    def _touched(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols, _ = self.coords()
        return torch.unique(rows), torch.unique(cols)

    def _saved_shape(self) -> tuple[int, ...]:
        return (self.coords()[0].numel(),)

    def _merge(self, weight: torch.Tensor) -> torch.Tensor:
        rows, cols, vals = (t.to(weight.device) for t in self.coords())
        original = weight[rows, cols]  # advanced indexing: a copy of the touched entries only
        dtype = _compute_dtype(weight.dtype, vals.dtype)
        weight.index_put_((rows, cols), (original.to(dtype) + vals.to(dtype)).to(weight.dtype))
        return original

    def _unmerge(self, weight: torch.Tensor, saved: torch.Tensor) -> None:
        rows, cols, _ = (t.to(weight.device) for t in self.coords())
        weight.index_put_((rows, cols), saved)


class _SliceDelta(_SupportDelta):
    """columns / rows: a slice of whole input columns (dim 1) or output rows (dim 0)."""

    dim: int
    tensor_fields = ("index", "values")

    def __init__(self, index, values: torch.Tensor, shape):
        self.shape = _check_shape(shape)
        if not isinstance(values, torch.Tensor):
            raise DeltaError(f"values must be a tensor, got {type(values).__name__}")
        self.index = _check_index(index, "index", self.shape[self.dim], values.device)
        expected = list(self.shape)
        expected[self.dim] = self.index.numel()
        self.values = _check_values(values, "values", tuple(expected))

    def coords(self):
        n = self.index.numel()
        other = torch.arange(self.shape[1 - self.dim], device=self.index.device)
        if self.dim == 1:
            rows, cols = other[:, None].expand(-1, n), self.index[None, :].expand(self.shape[0], -1)
        else:
            rows, cols = self.index[:, None].expand(-1, self.shape[1]), other[None, :].expand(n, -1)
        return rows.reshape(-1), cols.reshape(-1), self.values.reshape(-1)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        full = torch.zeros(self.shape, dtype=dtype, device=self.values.device)
        return full.index_copy_(self.dim, self.index, self.values.to(dtype))

    def _touched(self):
        everything = torch.arange(self.shape[1 - self.dim], device=self.index.device)
        picked = self.index.sort().values
        return (everything, picked) if self.dim == 1 else (picked, everything)

    def _saved_shape(self):
        return tuple(self.values.shape)

    def _merge(self, weight):
        index = self.index.to(weight.device)
        original = weight.index_select(self.dim, index)  # a copy of the slice only
        dtype = _compute_dtype(weight.dtype, self.values.dtype)
        merged = original.to(dtype) + self.values.to(weight.device, dtype)
        weight.index_copy_(self.dim, index, merged.to(weight.dtype))
        return original

    def _unmerge(self, weight, saved):
        weight.index_copy_(self.dim, self.index.to(weight.device), saved)

    def _same_kind_sum(self, other):
        index, values = _union(self.index, self.values, other.index, other.values, self.dim)
        return type(self)(index, values, self.shape)


class ColumnsDelta(_SliceDelta):
    """values (out, |S|) added to W[:, S]: a gather of the input columns S in the forward."""

    kind, dim = "columns", 1

    def _apply(self, x, y):
        x_cols = x.index_select(-1, self.index.to(x.device))
        return y + F.linear(x_cols, self.values.to(x.device, x.dtype)).to(y.dtype)

    def _exact_lora(self):
        if self.index.numel() > self.shape[0]:
            return super()._exact_lora()
        dtype = self.compute_dtype  # A picks the columns, B holds them: rank |S|
        return _one_hot(self.index, self.shape[1], dtype), self.values.to(dtype).contiguous(), 1.0, "one-hot columns"


class RowsDelta(_SliceDelta):
    """values (|S|, in) added to W[S, :]: a scatter into the output rows S in the forward."""

    kind, dim = "rows", 0

    def _apply(self, x, y):
        part = F.linear(x, self.values.to(x.device, x.dtype)).to(y.dtype)
        return y.index_add(-1, self.index.to(y.device), part)

    def _exact_lora(self):
        if self.index.numel() > self.shape[1]:
            return super()._exact_lora()
        dtype = self.compute_dtype  # B places the rows, A holds them: rank |S|
        return self.values.to(dtype).contiguous(), _one_hot(self.index, self.shape[0], dtype).t().contiguous(), 1.0, \
            "one-hot rows"


class BlocksDelta(_SupportDelta):
    """values (k, b, b): block i is the update of the (row_blocks[i], col_blocks[i]) tile of the b×b grid."""

    kind = "blocks"
    tensor_fields = ("row_blocks", "col_blocks", "values")
    meta_fields = ("block_size",)

    def __init__(self, row_blocks, col_blocks, block_size: int, values: torch.Tensor, shape):
        self.shape = _check_shape(shape)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise DeltaError(f"block_size must be a positive int, got {block_size!r}")
        if not isinstance(values, torch.Tensor):
            raise DeltaError(f"values must be a tensor, got {type(values).__name__}")
        self.block_size = block_size
        self.grid = (_num_blocks(self.shape[0], block_size), _num_blocks(self.shape[1], block_size))
        # a block-row or block-column may repeat (several blocks share it); a (row, col) pair may not
        self.row_blocks = self._check_blocks(row_blocks, "row_blocks", 0, values.device)
        self.col_blocks = self._check_blocks(col_blocks, "col_blocks", 1, values.device)
        if self.row_blocks.shape != self.col_blocks.shape:
            raise DeltaError(f"row_blocks and col_blocks must have equal length, got {self.row_blocks.numel()} and "
                             f"{self.col_blocks.numel()}")
        if torch.unique(self._keys()).numel() != self.row_blocks.numel():
            raise DeltaError("a block (row_blocks[i], col_blocks[i]) is listed twice; list each block once")
        self.values = _check_values(values, "values", (self.row_blocks.numel(), block_size, block_size))

    def _check_blocks(self, index, name: str, axis: int, device) -> torch.Tensor:
        index = _check_integer_vector(index, name, device)
        if int(index.min()) < 0 or int(index.max()) >= self.grid[axis]:
            raise DeltaError(f"{name} must lie in [0, {self.grid[axis]}) (a {self.shape[0]}x{self.shape[1]} matrix "
                             f"in blocks of {self.block_size}), got values in [{int(index.min())}, {int(index.max())}]")
        return index

    def _keys(self) -> torch.Tensor:
        return self.row_blocks * self.grid[1] + self.col_blocks

    def coords(self):
        b, k = self.block_size, self.row_blocks.numel()
        local = torch.arange(b, device=self.row_blocks.device)
        rows = (self.row_blocks[:, None] * b + local)[:, :, None].expand(k, b, b)
        cols = (self.col_blocks[:, None] * b + local)[:, None, :].expand(k, b, b)
        inside = (rows < self.shape[0]) & (cols < self.shape[1])  # drop the padding of edge blocks
        return rows[inside], cols[inside], self.values[inside]

    def _apply(self, x, y):
        b, (n_r, n_c) = self.block_size, self.grid
        flat = x.reshape(-1, self.shape[1])
        x_blocks = F.pad(flat, (0, n_c * b - self.shape[1])).reshape(-1, n_c, b)
        x_sel = x_blocks.index_select(1, self.col_blocks.to(x.device))  # (N, k, b): each block's input
        part = torch.einsum("nkc,kbc->nkb", x_sel, self.values.to(x.device, x.dtype))
        out = part.new_zeros(flat.shape[0], n_r, b).index_add_(1, self.row_blocks.to(x.device), part)
        return y + out.view(flat.shape[0], n_r * b)[:, : self.shape[0]].reshape(y.shape).to(y.dtype)

    def _same_kind_sum(self, other):
        if other.block_size != self.block_size:
            return self.to_sparse() + other.to_sparse()
        keys, values = _union(self._keys(), self.values, other._keys(), other.values, 0)
        return BlocksDelta(keys // self.grid[1], keys % self.grid[1], self.block_size, values, self.shape)


class SparseDelta(_SupportDelta):
    """values (k,) added at the row-major flat positions W.view(-1)[flat_index]."""

    kind = "sparse"
    tensor_fields = ("flat_index", "values")

    def __init__(self, flat_index, values: torch.Tensor, shape):
        self.shape = _check_shape(shape)
        if not isinstance(values, torch.Tensor):
            raise DeltaError(f"values must be a tensor, got {type(values).__name__}")
        self.flat_index = _check_index(flat_index, "flat_index", self.shape[0] * self.shape[1], values.device)
        self.values = _check_values(values, "values", (self.flat_index.numel(),))
        self._rows, self._cols = self.flat_index // self.shape[1], self.flat_index % self.shape[1]

    def coords(self):
        return self._rows, self._cols, self.values

    def _apply(self, x, y):
        part = x.index_select(-1, self._cols.to(x.device)) * self.values.to(x.device, x.dtype)
        return y.index_add(-1, self._rows.to(y.device), part.to(y.dtype))

    def _same_kind_sum(self, other):
        index, values = _union(self.flat_index, self.values, other.flat_index, other.values, 0)
        return SparseDelta(index, values, self.shape)


# ------------------------------------------------------------------------------------------------ lowrank, dense
class _WholeDelta(Delta):
    """Kinds that touch the whole weight: a merge keeps a copy of all of it, the only way to undo bit for bit."""

    def _saved_shape(self):
        return self.shape

    def _merge(self, weight):
        original = weight.detach().clone()
        dtype = _compute_dtype(weight.dtype, self.compute_dtype)
        weight.copy_((weight.to(dtype) + self.to_dense(dtype).to(weight.device)).to(weight.dtype))
        return original

    def _unmerge(self, weight, saved):
        weight.copy_(saved)


class LowRankDelta(_WholeDelta):
    """scale · B @ A with A (r, in) and B (out, r)."""

    kind = "lowrank"
    tensor_fields = ("A", "B")
    meta_fields = ("scale",)

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0, shape=None):
        if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor) or A.dim() != 2 or B.dim() != 2:
            raise DeltaError("A and B must be 2-D tensors, A (r, in_features) and B (out_features, r)")
        self.shape = _check_shape(shape if shape is not None else (B.shape[0], A.shape[1]))
        if A.shape[0] < 1:
            raise DeltaError(f"A must have at least one row (rank >= 1), got shape {tuple(A.shape)}")
        self.A = _check_values(A, "A", (A.shape[0], self.shape[1]))
        self.B = _check_values(B, "B", (self.shape[0], A.shape[0]))
        if B.device != A.device:
            raise DeltaError(f"A and B must be on one device, got {A.device} and {B.device}")
        self.scale = _check_scale(scale)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def to_dense(self, dtype=None):
        dtype = dtype or self.compute_dtype
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))

    def _apply(self, x, y):
        h = F.linear(x, self.A.to(x.device, x.dtype))
        return y + (self.scale * F.linear(h, self.B.to(x.device, x.dtype))).to(y.dtype)

    def exact_lora_rank(self):
        return min(self.rank, *self.shape)

    def _exact_lora(self):
        if self.rank > min(self.shape):  # e.g. after fusing many: one-hot factors of the product are smaller
            return super()._exact_lora()
        dtype = self.compute_dtype
        return self.A.to(dtype).contiguous(), self.B.to(dtype).contiguous(), self.scale, "direct"

    def scaled(self, weight):
        return LowRankDelta(self.A, self.B, self.scale * _check_scale(weight, "weight"))

    def _same_kind_sum(self, other):
        """[A₁; A₂] and [s₁B₁, s₂B₂] (scales folded into B unless equal): the rank adds up."""
        dtype = torch.promote_types(self.A.dtype, other.A.dtype)
        a = torch.cat([self.A.to(dtype), other.A.to(self.device, dtype)])
        if self.scale == other.scale:
            return LowRankDelta(a, torch.cat([self.B.to(dtype), other.B.to(self.device, dtype)], 1), self.scale)
        b = torch.cat([self.scale * self.B.to(dtype), other.scale * other.B.to(self.device, dtype)], 1)
        return LowRankDelta(a, b, 1.0)


class DenseDelta(_WholeDelta):
    """values (out, in): the whole update."""

    kind = "dense"
    tensor_fields = ("values",)

    def __init__(self, values: torch.Tensor, shape=None):
        if not isinstance(values, torch.Tensor) or values.dim() != 2:
            raise DeltaError("values must be a 2-D (out_features, in_features) tensor")
        self.shape = _check_shape(shape if shape is not None else tuple(values.shape))
        self.values = _check_values(values, "values", self.shape)

    def to_dense(self, dtype=None):
        return self.values.to(dtype or self.compute_dtype)

    def _apply(self, x, y):
        return y + F.linear(x, self.values.to(x.device, x.dtype)).to(y.dtype)

    def _same_kind_sum(self, other):
        dtype = torch.promote_types(self.values.dtype, other.values.dtype)
        return DenseDelta(self.values.to(dtype) + other.values.to(self.device, dtype))


KINDS: dict[str, type[Delta]] = {cls.kind: cls for cls in
                                 (ColumnsDelta, RowsDelta, BlocksDelta, SparseDelta, LowRankDelta, DenseDelta)}


# ------------------------------------------------------------------------------------------------- read, checked
def _read_delta(prefix: str, tensors: Mapping[str, torch.Tensor], meta: Mapping, check_finite: bool) -> Delta:
    def refuse(problem: str, fix: str = "re-save the adapter with subtune.save()") -> AdapterLoadError:
        return AdapterLoadError(f"adapter delta {prefix!r}: {problem}; {fix}")

    if not isinstance(meta, Mapping):
        raise refuse(f"its meta must be a JSON object, got {type(meta).__name__}")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise refuse(f"unknown delta kind {kind!r} (this subtune reads {', '.join(KINDS)})",
                     "it was written by a newer subtune: upgrade subtune to read it")
    cls = KINDS[kind]
    args = {}
    for name in cls.tensor_fields:
        key = f"{prefix}.{name}"
        if key not in tensors:
            raise refuse(f"the file lacks tensor {key!r} of its {kind} delta (truncated, or from another tool)")
        tensor = tensors[key]
        if not isinstance(tensor, torch.Tensor):
            raise refuse(f"{key!r} is a {type(tensor).__name__}, not a tensor")
        if check_finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise refuse(f"{key!r} holds NaN or inf values (the training diverged)",
                         "retrain with a lower learning rate, or load an earlier checkpoint")
        args[name] = tensor
    for name in cls.meta_fields:
        if name not in meta:
            raise refuse(f"its meta lacks {name!r}, which a {kind} delta needs")
        args[name] = meta[name]
    try:
        shape = _check_shape(meta.get("shape"))
        return cls(**args, shape=shape)
    except DeltaError as e:
        raise refuse(str(e)) from None
