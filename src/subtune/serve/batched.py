"""Batched per-request adapters: one forward over a batch whose rows use different adapters (or none).

The base model runs unchanged, so every Linear's base GEMM runs once for the whole batch. A forward hook on each
Linear that some adapter of the batch touches then adds each adapter's update to that adapter's rows only. No base
weight is copied or changed, per request or otherwise.

Why stacks: with K adapters of one row each, a per-adapter loop costs K small GEMVs plus their gathers and scatters
per module per decode step, and on a CPU that dispatch overhead rivalled the GEMVs' own memory traffic (issue #12:
0.70× the base's tokens/s at K = 16). So the column and row deltas (S²FT's kinds) of the batch's adapters are stacked
once per adapter set (`plan`), per module, into zero-padded tensors, in groups of similar size (`PAD_TOLERANCE`):
a step then costs one row gather, one column gather, one `bmm` and one `index_add_` (or scatter) per group, whatever
the number of adapters. The stack is a copy of adapter values only (never of a base weight); the padding adds exact
zeros, so each row's sum is that of its own adapter (the order of the additions is the bmm kernel's). Other kinds
(blocks, sparse, lowrank, dense) are applied per adapter with `Delta.apply` on its rows.

The hooks live only inside `routed(...)` and are removed on the way out, also when the forward or `generate` raises,
so the model is exactly the base again afterwards. Rows are grouped by adapter once per call (`RowGroups`).

HF `generate` with the KV cache feeds each Linear (rows, new tokens, features): the prefill, then one token per step,
always with the batch in the leading dim. Beam search and `num_return_sequences` expand each prompt into k
consecutive rows (`repeat_interleave`), which `RowGroups.rows` follows.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from subtune.core.deltas import Delta
from subtune.serve.errors import RoutingError

Term = tuple[str, Delta]  # (adapter name, its delta of one module)
STACKED_KINDS = ("columns", "rows")
PAD_TOLERANCE = 0.25  # a group's largest index is at most 1.25× its smallest: ≤ 25% zero padding, few groups


class RowGroups:
    """Which rows of a batch use which adapter: `adapter_names[i]` for row i, None for the plain base."""

    def __init__(self, adapter_names: Sequence[str | None], device: torch.device | str = "cpu"):
        self.batch_size = len(adapter_names)
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            if name is not None:
                rows.setdefault(name, []).append(i)
        self._rows = {name: torch.tensor(r, dtype=torch.long, device=device) for name, r in rows.items()}
        self._cache: dict[tuple, torch.Tensor | StackedRows | None] = {}

    @property
    def names(self) -> list[str]:
        """The adapters the batch uses, in order of first appearance."""
        return list(self._rows)

    def rows(self, name: str, leading: int, device: torch.device, where: str = "") -> torch.Tensor | None:
        """Indices into activations with `leading` rows that use `name`; None when that is every row (no gather).

        A leading dim of k·B (k beams or returned sequences per prompt, consecutive) maps prompt r to rows
        r·k … r·k+k−1."""
        key = (name, leading, device)
        if key not in self._cache:
            if leading % self.batch_size:
                raise RoutingError(
                    f"{where or 'a routed module'} got {leading} rows for a batch of {self.batch_size} prompts; "
                    "per-request adapters need the batch in the leading dim (do not flatten or pack the batch)")
            k = leading // self.batch_size
            rows = self._rows[name]
            if rows.numel() == self.batch_size:
                self._cache[key] = None
            else:
                expanded = (rows[:, None] * k + torch.arange(k, device=rows.device)).reshape(-1)
                self._cache[key] = expanded.to(device)
        return self._cache[key]

    def stacked_rows(self, names: tuple[str, ...], leading: int, device: torch.device, where: str = ""
                     ) -> StackedRows:
        """The rows of adapters `names` as one (len(names), R) table, R the most rows any of them has; computed
        once per batch and leading size, not per module or step."""
        key = (names, leading, device)
        if key not in self._cache:
            per_name = [self.rows(n, leading, device, where) for n in names]
            per_name = [torch.arange(leading, device=device) if r is None else r for r in per_name]
            width = max(r.numel() for r in per_name)
            table = torch.stack([torch.cat([r, r[:1].expand(width - r.numel())]) for r in per_name])
            valid = None
            if any(r.numel() < width for r in per_name):  # padded slots repeat a real row and are never written
                valid = torch.cat([torch.arange(r.numel(), device=device) + i * width for i, r in enumerate(per_name)])
            self._cache[key] = StackedRows(table.reshape(-1), width, valid,
                                           table.reshape(-1) if valid is None else table.reshape(-1)[valid])
        return self._cache[key]


@dataclass(frozen=True)
class StackedRows:
    gather: torch.Tensor  # (m·R,) batch rows to read, adapter by adapter, padded with a repeat of a real row
    width: int  # R
    valid: torch.Tensor | None  # positions of the real slots in `gather` (None: all are real)
    target: torch.Tensor  # the batch rows of the real slots, in order: where results go


def size_groups(sizes: Sequence[int], tolerance: float = PAD_TOLERANCE) -> list[list[int]]:
    """Positions of `sizes` grouped so that in each group the largest is ≤ (1 + tolerance) × the smallest."""
    groups: list[list[int]] = []
    for i in sorted(range(len(sizes)), key=lambda j: sizes[j]):
        if groups and sizes[i] <= (1 + tolerance) * sizes[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class Stack:
    """The columns (or rows) deltas of several adapters in one module, zero-padded to one index length.

    Built once in the module weight's dtype and device (where x is: `Delta.apply` computes in x's dtype, so this is
    the same rounding it would do per call): a copy of those adapters' values only, plus the padding."""

    def __init__(self, kind: str, terms: Sequence[Term], dtype: torch.dtype, device: torch.device):
        self.kind, self.names = kind, tuple(name for name, _ in terms)
        deltas = [delta for _, delta in terms]
        size = max(d.index.numel() for d in deltas)
        self.index = torch.zeros(len(deltas), 1, size, dtype=torch.long, device=device)
        other = deltas[0].shape[0 if kind == "columns" else 1]
        # columns: (m, |S|, out) so that bmm(x_S, V) is x_S @ valuesᵀ; rows: (m, in, |S|), likewise
        shape = (len(deltas), size, other) if kind == "columns" else (len(deltas), other, size)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        for i, d in enumerate(deltas):
            n = d.index.numel()
            self.index[i, 0, :n] = d.index
            target = self.values[i, :n] if kind == "columns" else self.values[i, :, :n]
            target.copy_(d.values.t())

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.index.numel() * self.index.element_size()

    def add_to(self, x: torch.Tensor, out: torch.Tensor, rows: StackedRows) -> None:
        """out[rows of adapter i] += update_i(x[those rows]) for every adapter i of the stack, in place.

        x (lead, T, in) and out (lead, T, out_features), views of the module's input and fresh output."""
        values, index = self.values.to(x.dtype), self.index
        m, tokens = len(self.names), x.shape[1]
        xs = x.index_select(0, rows.gather).view(m, rows.width * tokens, x.shape[-1])
        picked = index.expand(m, rows.width * tokens, index.shape[-1])
        if self.kind == "columns":  # gather the selected input columns, one bmm, add into the rows
            part = torch.bmm(torch.gather(xs, 2, picked), values).view(-1, tokens, out.shape[-1])
            if rows.valid is not None:
                part = part.index_select(0, rows.valid)
            out.index_add_(0, rows.target, part.to(out.dtype))
        else:  # one bmm, scatter into the selected outputs of the rows
            part = torch.bmm(xs, values)
            ys = out.index_select(0, rows.gather).view(m, rows.width * tokens, out.shape[-1])
            ys = ys.scatter_add_(2, picked, part.to(out.dtype)).view(-1, tokens, out.shape[-1])
            if rows.valid is not None:
                ys = ys.index_select(0, rows.valid)
            out.index_copy_(0, rows.target, ys)


@dataclass
class ModuleRoute:
    """What one module adds for the adapters of a batch: stacks of columns/rows deltas, the other terms one by one."""
    stacks: list[Stack]
    loose: tuple[Term, ...]

    @property
    def adapters(self) -> list[str]:
        return [name for stack in self.stacks for name in stack.names] + [name for name, _ in self.loose]

    @property
    def nbytes(self) -> int:
        return sum(stack.nbytes for stack in self.stacks)


def _module_route(terms: Sequence[Term], weight: torch.Tensor) -> ModuleRoute:
    stacks = []
    for kind in STACKED_KINDS:
        same = [t for t in terms if t[1].kind == kind]
        for group in size_groups([delta.index.numel() for _, delta in same]):
            stacks.append(Stack(kind, [same[i] for i in group], weight.dtype, weight.device))
    return ModuleRoute(stacks, tuple(t for t in terms if t[1].kind not in STACKED_KINDS))


def _check_linear(path: str, module: nn.Module, adapter: str) -> None:
    if not isinstance(module, nn.Linear):
        raise RoutingError(
            f"adapter {adapter!r} changes {path}, a {type(module).__name__}, whose update cannot be added per row; "
            "serve that adapter merged (store.activate(name)) instead")


def plan(deltas_by_adapter: Mapping[str, Mapping[str, Delta]], modules: Mapping[str, nn.Module]
         ) -> dict[str, ModuleRoute]:
    """{module path: ModuleRoute} over the given adapters (a batch's): which hooks to install and what they add.
    Depends only on the adapters, not on the rows, so a store can keep it for the next batch of the same set.
    Refuses a delta on a module that is not a Linear before building anything."""
    terms: dict[str, list[Term]] = {}
    for name, deltas in deltas_by_adapter.items():
        for path, delta in deltas.items():
            _check_linear(path, modules[path], name)
            terms.setdefault(path, []).append((name, delta))
    return {path: _module_route(t, modules[path].weight) for path, t in terms.items()}


def _hook(path: str, route: ModuleRoute, groups: RowGroups):
    """Adds each adapter's term to its rows of the module's output (the base GEMM already ran for all rows)."""
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        if route.stacks:  # in place on the fresh output: routing runs under no_grad
            lead = x.shape[0]
            x3, out3 = x.reshape(lead, -1, x.shape[-1]), output.view(lead, -1, output.shape[-1])
            for stack in route.stacks:
                stack.add_to(x3, out3, groups.stacked_rows(stack.names, lead, output.device, where=path))
        for name, delta in route.loose:
            rows = groups.rows(name, x.shape[0], output.device, where=path)
            if rows is None:
                output = delta.apply(x, output)
            else:
                part = delta.apply(x.index_select(0, rows.to(x.device)), output.index_select(0, rows))
                output.index_copy_(0, rows, part)
        return output

    return hook


@contextmanager
def routed(modules: Mapping[str, nn.Module], routes: Mapping[str, ModuleRoute], groups: RowGroups
           ) -> Iterator[None]:
    """Inside: each module in `routes` adds its adapters' updates to their rows. On the way out (also on an
    error) every hook installed here is removed, and only those."""
    handles = []
    try:
        with torch.no_grad():
            for path, route in routes.items():
                unknown = sorted(set(route.adapters) - set(groups.names))
                if unknown:
                    raise RoutingError(f"{path}: the routing plan holds adapters {unknown} that this batch does not "
                                       "use; build the plan from the batch's adapters (plan over groups.names)")
                _check_linear(path, modules[path], route.adapters[0])
                handles.append(modules[path].register_forward_hook(_hook(path, route, groups)))
            yield
    finally:
        for handle in handles:
            handle.remove()
