"""Many fine-tuned variants on one base: adapters kept as deltas beside one shared base model.

`AdapterStore(base)` holds {name: {module path: Delta}} and the base, never a copy of a base weight per adapter.
It serves an adapter three ways, all written once over deltas (no method code):

- `activate(name)`: merge it into the base in place by scatter (`Delta.merge_into`), for zero-overhead
  single-adapter inference; switching first restores the previous adapter's saved original entries exactly
  (`Delta.unmerge_from`), and `activate(None)` gives back the base bit for bit.
- `generate(input_ids, adapter_names)` / `logits(...)`: every row of a batch with its own adapter (or None = the
  base), through forward hooks that exist only during the call (`serve/batched.py`).
- `fuse({"cs": 1.0, "math": 1.0}, name="both")`: a new adapter from the weighted sum of deltas.

The store assumes it owns the base while it lives: change the base's weights only through it (the base fingerprint
taken at construction is what adapters are checked against).
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from subtune.core.api import STATE_ATTR, read_adapter_config
from subtune.core.deltas import Delta
from subtune.core.deltas import fuse as fuse_deltas
from subtune.core.errors import NonFiniteError
from subtune.core.fingerprint import fingerprint, fingerprint_difference
from subtune.serve import batched
from subtune.serve.errors import (
    AdapterActiveError, AdapterMismatchError, AdapterNameError, DuplicateAdapterError, RoutingError, ServeError,
    UnknownAdapterError, WrongBaseError,
)


@dataclass
class _Adapter:
    deltas: dict[str, Delta]
    info: dict[str, Any] = field(default_factory=dict)


def _read_deltas_function():
    """`subtune.core.api.read_deltas`, looked up at call time (the adapter-format wiring of issue #11 adds it)."""
    try:
        from subtune.core.api import read_deltas
    except ImportError:
        raise ServeError("this subtune cannot read deltas from an adapter directory yet (subtune.read_deltas is "
                         "missing); build the deltas yourself and call store.add_deltas(name, deltas)") from None
    return read_deltas


class AdapterStore:
    """Adapters as deltas beside one shared base model; see the module docstring.

    Every method is safe to call from several threads (one lock): a batch routes, a switch merges, one at a time.
    """

    def __init__(self, base_model: nn.Module):
        if not isinstance(base_model, nn.Module):
            raise ServeError(f"AdapterStore needs the base model (a torch nn.Module such as LlamaForCausalLM), got "
                             f"{type(base_model).__name__}")
        wrapped = [f"{n} ({type(m).__module__}.{type(m).__name__})" for n, m in base_model.named_modules()
                   if type(m).__module__.startswith(("subtune.", "peft."))]
        if getattr(base_model, STATE_ATTR, None) is not None or wrapped:
            raise ServeError(
                "AdapterStore needs a plain base model, but this one has adapter layers attached "
                f"({wrapped[0] if wrapped else 'a subtune method'}); pass a fresh base and add adapters as deltas "
                "(store.add(name, adapter_dir) or store.add_deltas), or subtune.unload() a model to serve it merged")
        self.model = base_model
        self._fingerprint = fingerprint(base_model)  # of the plain base: adapters are checked against it
        self._modules = dict(base_model.named_modules(remove_duplicate=False))
        self._adapters: dict[str, _Adapter] = {}
        self._active: str | None = None
        self._saved: dict[str, torch.Tensor] = {}  # module path -> original entries of the active adapter
        self._routes: tuple[tuple, dict[str, batched.ModuleRoute]] | None = None  # (adapter set, its plan)
        self._lock = threading.RLock()

    # ---------------------------------------------------------------------------------------------- the adapters
    def names(self) -> list[str]:
        """The adapters' names, in the order they were added."""
        return list(self._adapters)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    def deltas(self, name: str) -> dict[str, Delta]:
        """{module path: Delta} of adapter `name` (the store's own records: deltas are values, never changed)."""
        return dict(self._get(name).deltas)

    def info(self, name: str) -> dict[str, Any]:
        """What was said about the adapter when it was added (its directory and method, or what it was fused from)."""
        return dict(self._get(name).info)

    def memory(self, name: str | None = None) -> int:
        """Bytes of adapter `name`'s deltas (indices and values); without a name, of all adapters, each tensor
        counted once (a fused adapter may share a source's tensors). The base is not counted: it is shared."""
        if name is not None:
            return sum(delta.nbytes for delta in self._get(name).deltas.values())
        seen: dict[tuple, int] = {}
        for adapter in self._adapters.values():
            for delta in adapter.deltas.values():
                for t in delta.to_tensors("").values():
                    seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return sum(seen.values())

    @property
    def active_saved_bytes(self) -> int:
        """Bytes of base entries kept while an adapter is active (to restore them exactly): the touched entries for
        columns / rows / blocks / sparse deltas, the whole weight for lowrank / dense ones."""
        return sum(t.numel() * t.element_size() for t in self._saved.values())

    def add_deltas(self, name: str, deltas: Mapping[str, Delta], fingerprint: Mapping | None = None,
                   info: Mapping[str, Any] | None = None) -> str:
        """Add an adapter given as {module path: Delta} in the base's coordinates; returns its name.

        Refuses, before storing anything: a name already taken, a `fingerprint` (the adapter's saved base
        fingerprint) of another base, a path the base lacks or a delta whose shape differs from the module's
        weight, and NaN/inf values. The deltas are kept as given (moved to the weight's device if needed), not
        copied: clone them first if their source keeps training.
        """
        with self._lock:
            self._check_new_name(name)
            if fingerprint is not None:
                self._check_base(fingerprint, f"adapter {name!r}")
            checked = self._checked_deltas(name, deltas)
            self._adapters[name] = _Adapter(checked, dict(info or {}))
            return name

    def add(self, name: str, adapter_dir: str | Path) -> str:
        """Add the adapter saved in `adapter_dir` (by `subtune.save`); returns its name.

        The name and the adapter's base fingerprint are checked before its tensors are read; the deltas come from
        `subtune.read_deltas` (no method code), read against the plain base (an active adapter is unmerged for the
        read and merged back)."""
        with self._lock:
            self._check_new_name(name)
            cfg = read_adapter_config(adapter_dir)
            self._check_base(cfg.get("fingerprint"), f"the adapter in {adapter_dir}",
                             cfg.get("base_model_name_or_path"))
            read_deltas = _read_deltas_function()
            with self._plain_base():
                deltas = read_deltas(adapter_dir, base=self.model)
            info = {"directory": str(adapter_dir), "method": cfg.get("method"),
                    "base_model_name_or_path": cfg.get("base_model_name_or_path")}
            return self.add_deltas(name, deltas, info=info)

    def remove(self, name: str) -> None:
        """Drop adapter `name` (restoring the base first if it is the active one)."""
        with self._lock:
            self._get(name)
            if self._active == name:
                self.activate(None)
            del self._adapters[name]
            self._routes = None  # its stacks go with it (and a later adapter may reuse the name)

    # ------------------------------------------------------------------------------------------- fast switch
    @property
    def active(self) -> str | None:
        """The adapter merged into the base, or None when the base is plain."""
        return self._active

    def activate(self, name: str | None) -> None:
        """Merge adapter `name` into the base in place (None: plain base), restoring the previous one's original
        entries exactly first. The merged model runs at the base's own cost; `activate(None)` gives back the base
        bit for bit."""
        with self._lock:
            if name is not None:
                self._get(name)
            if name == self._active:
                return
            self._unmerge_active()
            if name is not None:
                self._merge(name)

    def _merge(self, name: str) -> None:
        saved: dict[str, torch.Tensor] = {}
        deltas = self._adapters[name].deltas
        try:
            for path, delta in deltas.items():
                saved[path] = delta.merge_into(self._weight(path))
        except BaseException:  # leave the base as it was: undo what merged, newest first
            for path in reversed(list(saved)):
                deltas[path].unmerge_from(self._weight(path), saved[path])
            raise
        self._saved, self._active = saved, name

    def _unmerge_active(self) -> None:
        if self._active is None:
            return
        deltas = self._adapters[self._active].deltas
        for path, saved in self._saved.items():  # every check before the first write
            weight = self._weight(path)
            if weight.dtype != saved.dtype or weight.device != saved.device:
                raise ServeError(
                    f"the base was moved or cast ({path}: {saved.dtype} on {saved.device} -> {weight.dtype} on "
                    f"{weight.device}) while adapter {self._active!r} was active, so its saved entries no longer "
                    f"fit; move or cast the model back to {saved.dtype} on {saved.device}, then activate(None)")
        for path in reversed(list(self._saved)):  # newest first: tied weights touched twice unwind in order
            deltas[path].unmerge_from(self._weight(path), self._saved[path])
        self._saved, self._active = {}, None

    @contextmanager
    def _plain_base(self) -> Iterator[None]:
        """The base without the active adapter, for the duration; the adapter is merged back afterwards."""
        active = self._active
        self.activate(None)
        try:
            yield
        finally:
            self.activate(active)

    # ------------------------------------------------------------------------------------------------- fusion
    def fuse(self, weights: Mapping[str, float], name: str, info: Mapping[str, Any] | None = None) -> str:
        """Add adapter `name` = Σ weightᵢ · adapterᵢ, module by module; returns its name.

        Modules are the union of the adapters' modules. A module one adapter touches keeps that delta (scaled).
        Where several touch one module their deltas are summed (`subtune.core.deltas.fuse`):
        - the same kind keeps its kind: columns / rows / sparse take the union of their indices, blocks the union of
          their blocks (equal block sizes; otherwise sparse), overlapping entries summed with their weights;
        - lowrank + lowrank stays lowrank by concatenating the factors ([A₁; A₂], [w₁s₁B₁, w₂s₂B₂]): the rank adds
          up, nothing is densified or approximated;
        - a mix of columns / rows / blocks / sparse becomes one sparse delta (still only the touched entries);
        - lowrank or dense mixed with any other kind becomes a dense (out, in) delta: a full matrix per such
          module, which costs a dense weight's memory and a whole-weight merge.
        """
        with self._lock:
            self._check_new_name(name)
            if not isinstance(weights, Mapping) or not weights:
                raise ServeError(f"fuse needs a non-empty mapping {{adapter name: weight}}, got {weights!r}")
            for source, weight in weights.items():
                self._get(source)
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                    raise ServeError(f"fuse weight of {source!r} must be a finite number, got {weight!r}")
            by_module: dict[str, tuple[list[Delta], list[float]]] = {}
            for source, weight in weights.items():
                for path, delta in self._adapters[source].deltas.items():
                    parts = by_module.setdefault(path, ([], []))
                    parts[0].append(delta)
                    parts[1].append(float(weight))
            fused = {path: fuse_deltas(ds, ws) for path, (ds, ws) in by_module.items()}
            record = {"fused_from": {k: float(v) for k, v in weights.items()}, **dict(info or {})}
            self._adapters[name] = _Adapter(fused, record)
            return name

    # --------------------------------------------------------------------------------- per-request adapters
    def generate(self, input_ids: torch.Tensor, adapter_names: Sequence[str | None],
                 attention_mask: torch.Tensor | None = None, **generate_kwargs):
        """`model.generate` (KV cache and all) where row i uses adapter `adapter_names[i]` (None: the base).

        The base GEMMs run once for the whole batch; each adapter adds its term to its own rows only. Refused while
        an adapter is active (merged): call `activate(None)` first. The base is untouched before and after.
        """
        with self._lock:
            groups, terms = self._route(input_ids, adapter_names)
            if attention_mask is not None:
                generate_kwargs["attention_mask"] = attention_mask
            with batched.routed(self._modules, terms, groups):
                return self.model.generate(input_ids=input_ids, **generate_kwargs)

    def logits(self, input_ids: torch.Tensor, adapter_names: Sequence[str | None],
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The next-token logits (batch, seq, vocab) of one forward, row i with adapter `adapter_names[i]`."""
        with self._lock:
            groups, terms = self._route(input_ids, adapter_names)
            with batched.routed(self._modules, terms, groups):
                return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _route(self, input_ids, adapter_names) -> tuple[batched.RowGroups, dict]:
        if self._active is not None:
            raise AdapterActiveError(
                f"adapter {self._active!r} is merged into the base (activate({self._active!r})); per-request routing "
                "needs the plain base: call store.activate(None) first")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise RoutingError(f"input_ids must be a 2-D (batch, seq) tensor, got {got}")
        if isinstance(adapter_names, (str, bytes)) or not isinstance(adapter_names, Sequence):
            raise RoutingError(f"adapter_names must be a list with one adapter name (or None) per row, got "
                               f"{adapter_names!r}")
        if len(adapter_names) != input_ids.shape[0]:
            raise RoutingError(f"adapter_names has {len(adapter_names)} entries for a batch of {input_ids.shape[0]} "
                               "rows; give one adapter name (or None for the base) per row")
        for name in adapter_names:
            if name is not None:
                self._get(name)
        groups = batched.RowGroups(adapter_names, input_ids.device)
        return groups, self._plan(groups.names)

    def _plan(self, names: Sequence[str]) -> dict[str, batched.ModuleRoute]:
        """The routing plan of this set of adapters: kept for the next batch of the same set (the stacks are built
        once, not per batch), dropped when another set comes, an adapter is removed, or the base is moved or cast."""
        key = (tuple(sorted(names)), self._weights_layout())
        if self._routes is None or self._routes[0] != key:
            self._routes = None  # the old stacks go before the new ones are built
            self._routes = (key, batched.plan({n: self._adapters[n].deltas for n in key[0]}, self._modules))
        return self._routes[1]

    def _weights_layout(self) -> tuple:
        weight = next(self.model.parameters(), None)
        return (None, None) if weight is None else (weight.dtype, weight.device)

    @property
    def routing_cache_bytes(self) -> int:
        """Bytes of the stacked adapter values kept for the last batch's set of adapters (`serve/batched.py`): a
        copy of those adapters' column/row values (plus padding) in the weights' dtype, never of a base weight."""
        return 0 if self._routes is None else sum(route.nbytes for route in self._routes[1].values())

    # ------------------------------------------------------------------------------------------------- checks
    def _get(self, name: str) -> _Adapter:
        try:
            return self._adapters[name]
        except (KeyError, TypeError):
            raise UnknownAdapterError(f"unknown adapter {name!r}; the store has {self.names()} (store.names()): add "
                                      "it with store.add(name, adapter_dir) first") from None

    def _check_new_name(self, name: Any) -> None:
        if not isinstance(name, str) or not name.strip():
            raise AdapterNameError(f"an adapter name must be a non-empty string, got {name!r}")
        if name in self._adapters:
            raise DuplicateAdapterError(f"adapter name {name!r} is already taken in this store; pick another name or "
                                        f"store.remove({name!r}) first")

    def _check_base(self, saved: Any, what: str, base_name: str | None = None) -> None:
        if not isinstance(saved, Mapping):
            raise WrongBaseError(f"{what} carries no base fingerprint (got {type(saved).__name__}), so the store "
                                 "cannot tell which base it was made for; re-save it with subtune.save()")
        diff = fingerprint_difference(dict(saved), self._fingerprint)
        if diff:
            made_for = f" ({base_name})" if base_name else ""
            raise WrongBaseError(
                f"{what} was made for a different base model{made_for} than this store's ({diff}); add it to a store "
                "of the base it was trained on")

    def _weight(self, path: str) -> torch.Tensor:
        """The module's own weight parameter as an (out, in) matrix (a vector such as a norm's as (1, n))."""
        weight = self._modules[path]._parameters.get("weight")
        return weight if weight.dim() == 2 else weight.view(1, -1)

    def _checked_deltas(self, name: str, deltas: Any) -> dict[str, Delta]:
        if not isinstance(deltas, Mapping) or not deltas:
            raise AdapterMismatchError(f"adapter {name!r}: deltas must be a non-empty mapping {{module path: Delta}}, "
                                       f"got {deltas!r}")
        checked = {}
        for path, delta in deltas.items():
            where = f"adapter {name!r}, module {path!r}"
            if not isinstance(delta, Delta):
                raise AdapterMismatchError(f"{where}: expected a subtune Delta, got {type(delta).__name__}; build it "
                                           "with Delta.columns / rows / blocks / sparse / lowrank / dense")
            module = self._modules.get(path) if isinstance(path, str) else None
            if module is None:
                raise AdapterMismatchError(f"{where}: the base has no module at that path; the adapter was made for "
                                           "another architecture, or its paths carry a wrapper's prefix (use the "
                                           "plain model's module names, e.g. 'model.layers.0.mlp.down_proj')")
            weight = module._parameters.get("weight")
            if not isinstance(weight, torch.Tensor) or weight.dim() not in (1, 2):
                raise AdapterMismatchError(f"{where}: the module ({type(module).__name__}) holds no weight parameter "
                                           "of its own; serve a plain base model, not a wrapped or quantised one")
            shape = tuple(weight.shape) if weight.dim() == 2 else (1, weight.shape[0])
            if delta.shape != shape:
                raise AdapterMismatchError(f"{where}: the delta's shape {delta.shape} differs from the weight's "
                                           f"{shape}; the adapter was made for another base model")
            for field_name, t in delta.to_tensors(path).items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(f"{where}: {field_name} holds NaN or inf values (the training diverged); "
                                         "retrain with a lower learning rate or use an earlier checkpoint")
            checked[path] = delta if delta.device == weight.device else delta.to(weight.device)
        return checked
