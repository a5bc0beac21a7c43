"""Batched per-request adapters: one forward over a batch whose rows use different adapters (or none).

The base model runs unchanged, so every Linear's base GEMM runs once for the whole batch. A forward hook on each
Linear that some adapter of the batch touches then adds, for each such adapter, its update to that adapter's rows
only: `Delta.apply` on the gathered rows, which for S²FT's kinds gathers just the selected input columns (columns)
or scatters into just the selected outputs (rows), and for SMT / SensZOQ / LoRA touches only their blocks, entries or
rank-r factors. No weight is copied or changed, per request or otherwise.

The hooks live only inside `routed(...)` and are removed on the way out, also when the forward or `generate` raises,
so the model is exactly the base again afterwards. Rows are grouped by adapter once per call (`RowGroups`).

HF `generate` with the KV cache feeds each Linear (rows, new tokens, features): the prefill, then one token per step,
always with the batch in the leading dim. Beam search and `num_return_sequences` expand each prompt into k
consecutive rows (`repeat_interleave`), which `RowGroups.rows` follows.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from subtune.core.deltas import Delta
from subtune.serve.errors import RoutingError

Term = tuple[str, Delta]  # (adapter name, its delta of one module)


class RowGroups:
    """Which rows of a batch use which adapter: `adapter_names[i]` for row i, None for the plain base."""

    def __init__(self, adapter_names: Sequence[str | None], device: torch.device | str = "cpu"):
        self.batch_size = len(adapter_names)
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            if name is not None:
                rows.setdefault(name, []).append(i)
        self._rows = {name: torch.tensor(r, dtype=torch.long, device=device) for name, r in rows.items()}
        self._cache: dict[tuple[str, int, torch.device], torch.Tensor | None] = {}

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


def _hook(path: str, terms: tuple[Term, ...], groups: RowGroups):
    """Adds each adapter's term to its rows of the module's output (the base GEMM already ran for all rows)."""

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        for name, delta in terms:
            rows = groups.rows(name, x.shape[0], output.device, where=path)
            if rows is None:
                output = delta.apply(x, output)
            else:  # in place on the fresh output: routing runs under no_grad
                part = delta.apply(x.index_select(0, rows.to(x.device)), output.index_select(0, rows))
                output.index_copy_(0, rows, part)
        return output

    return hook


def plan(deltas_by_adapter: Mapping[str, Mapping[str, Delta]], groups: RowGroups) -> dict[str, tuple[Term, ...]]:
    """{module path: ((adapter, delta), ...)} over the adapters the batch uses: which hooks to install."""
    terms: dict[str, list[Term]] = {}
    for name in groups.names:
        for path, delta in deltas_by_adapter[name].items():
            terms.setdefault(path, []).append((name, delta))
    return {path: tuple(t) for path, t in terms.items()}


@contextmanager
def routed(modules: Mapping[str, nn.Module], terms: Mapping[str, tuple[Term, ...]], groups: RowGroups
           ) -> Iterator[None]:
    """Inside: each module in `terms` adds its adapters' updates to their rows. On the way out (also on an
    error) every hook installed here is removed, and only those."""
    handles = []
    try:
        with torch.no_grad():
            for path, module_terms in terms.items():
                module = modules[path]
                if not isinstance(module, nn.Linear):
                    raise RoutingError(
                        f"{path} is a {type(module).__name__}, not a Linear, so its update cannot be added per row; "
                        "serve that adapter merged instead (store.activate(name))")
                handles.append(module.register_forward_hook(_hook(path, module_terms, groups)))
            yield
    finally:
        for handle in handles:
            handle.remove()
