"""The adapter format, version 2 (docs/FORMAT.md): one directory, two files, readable with no method code.

    adapter_config.json   format_version 2, method, config, selection info, fingerprint, base_changed, a summary of
                          the deltas, the sha256 of the tensor file
    adapter.safetensors   delta.<module path>.<field>  the trained update per module (`subtune.core.deltas`), its
                                                       table {module path: kind, shape, block_size | scale} in the
                                                       header under "subtune.deltas"
                          selection.<name>             what the method selected (indices), for its `attach`
                          state.<name>                 what resuming training needs beyond the deltas; for a
                                                       `base_changed` adapter also the absolute weights that replace
                                                       base tensors, under the plain base's state_dict names

Why a module of its own: `read_deltas` and `merge_deltas` must work for any adapter without importing a method
(serving, other tools), so everything here depends only on core/deltas, io, guards and fingerprint. `api.save` /
`api.load` add the method's doors on top.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from subtune.core import guards, io
from subtune.core.deltas import (
    DELTA_PREFIX, Delta, DeltaError, deltas_to_tensors, read_delta_file, write_delta_file,
)
from subtune.core.errors import AdapterLoadError, SubtuneError
from subtune.core.fingerprint import check_fingerprint
from subtune.core.guards import CONFIG_FILE, WEIGHTS_FILE

SELECTION_PREFIX = "selection."
STATE_PREFIX = "state."
PREFIXES = (DELTA_PREFIX, SELECTION_PREFIX, STATE_PREFIX)
_FIX = "the adapter is corrupt or was edited: re-save it from the trained model"


def installed_version() -> str:
    """This subtune's version, from the installed distribution (no import of the package itself)."""
    try:
        return importlib.metadata.version("subtune")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0.0.0"


@dataclass
class AdapterContents:
    """What one adapter.safetensors holds, split by namespace."""

    deltas: dict[str, Delta]
    selection: dict[str, torch.Tensor]
    training_state: dict[str, torch.Tensor]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor under its name in the file (for finite checks; shares storage, no copies)."""
        out = deltas_to_tensors(self.deltas)[0] if self.deltas else {}
        out.update({SELECTION_PREFIX + k: v for k, v in self.selection.items()})
        out.update({STATE_PREFIX + k: v for k, v in self.training_state.items()})
        return out


def delta_summary(deltas: Mapping[str, Delta]) -> dict[str, Any]:
    """The JSON summary in adapter_config.json: how many modules, of which kinds, how many stored values."""
    kinds: dict[str, int] = {}
    for delta in deltas.values():
        kinds[delta.kind] = kinds.get(delta.kind, 0) + 1
    return {"modules": len(deltas), "kinds": dict(sorted(kinds.items())),
            "values": sum(delta.num_values for delta in deltas.values())}


def write_adapter_file(path: Path, contents: AdapterContents) -> str:
    """Write adapter.safetensors atomically; returns its sha256."""
    extra = {SELECTION_PREFIX + k: v for k, v in contents.selection.items()}
    extra.update({STATE_PREFIX + k: v for k, v in contents.training_state.items()})
    return write_delta_file(path, contents.deltas, extra=extra)


def read_adapter_file(path: Path, expected_sha256: str, *, allow_nonfinite: bool = False,
                      option_names: Mapping[str, str] | None = None) -> AdapterContents:
    """The checked contents of adapter.safetensors: checksum, delta table, every tensor in a known namespace, and
    (unless allow_nonfinite) no NaN/inf anywhere (NonFiniteError naming the tensor)."""
    deltas, others = read_delta_file(path, expected_sha256, check_finite=False)
    foreign = sorted(k for k in others if not k.startswith(PREFIXES))
    if foreign:
        raise AdapterLoadError(f"{path} holds tensor {foreign[0]!r} outside the delta./selection./state. namespaces "
                               f"of format 2 ({len(foreign)} such); {_FIX}")
    contents = AdapterContents(
        deltas,
        {k[len(SELECTION_PREFIX):]: v for k, v in others.items() if k.startswith(SELECTION_PREFIX)},
        {k[len(STATE_PREFIX):]: v for k, v in others.items() if k.startswith(STATE_PREFIX)},
    )
    if not allow_nonfinite:
        guards.check_finite(contents.tensors(), "load", where=f"{path}: ", option_names=option_names)
    return contents


def read_config(directory: str | Path, current_version: str, verb: str = "load") -> dict[str, Any]:
    """The checked adapter_config.json of a subtune adapter directory (types, required fields, versions)."""
    directory = _directory(directory, verb)
    io.recover_directory(directory)  # a save killed between its two fallback renames left the old one aside
    if not directory.is_dir():
        raise AdapterLoadError(f"adapter directory {directory} does not exist; pass a directory written by "
                               "subtune.save()")
    cfg = io.read_json(directory / CONFIG_FILE)
    guards.check_adapter_config(cfg, directory / CONFIG_FILE, current_version)
    return cfg


def _directory(directory: Any, verb: str) -> Path:
    if isinstance(directory, (str, Path)) or hasattr(directory, "__fspath__"):
        return Path(directory)
    raise AdapterLoadError(f"subtune.{verb}() needs a directory path (str or Path), got {type(directory).__name__}")


# ----------------------------------------------------------------------------------------------- read_deltas

def read_deltas(adapter_dir: str | Path, base: nn.Module | None = None) -> dict[str, Delta]:
    """{module path: Delta} of a saved adapter, each the update of that module's weight in the original base's
    coordinates (`delta.to_dense()` is the (out, in) matrix to add). No method code is imported or run.

    A `base_changed` adapter (full fine-tuning, MeZO, SMT with warm-up updates) stores absolute weights that replace
    base tensors; it is read against `base` (a model of the original base, checked by fingerprint): each such
    weight becomes a dense delta `trained - base` (1-D weights such as norms as shape (1, n)), added to the module's
    own delta if it has one; weights the adapter left equal to the base are left out. Without `base` it is refused.
    For other adapters `base` is optional and only checked.
    """
    directory = _directory(adapter_dir, "read_deltas")
    cfg = read_config(directory, installed_version(), "read_deltas")
    if base is not None:
        guards.check_model(base, "read_deltas")
        _check_plain(base, directory)
        check_fingerprint(cfg["fingerprint"], base, directory)
    contents = read_adapter_file(directory / WEIGHTS_FILE, cfg["adapter_sha256"])
    if not cfg.get("base_changed", False):
        return contents.deltas
    if base is None:
        raise AdapterLoadError(
            f"the {cfg['method']!r} adapter in {directory} is not a pure update of its base (base_changed: it stores "
            f"absolute weights that replace {len(contents.training_state)} base tensors, e.g. full fine-tuning or a "
            "warm-up that trained the base), so its deltas exist only against that base: pass "
            "base=<the original base model> to read_deltas")
    return deltas_against(base, contents.deltas, contents.training_state, directory)


@torch.no_grad()
def deltas_against(base: nn.Module, deltas: Mapping[str, Delta], absolute: Mapping[str, torch.Tensor],
                   where: Any = "the adapter") -> dict[str, Delta]:
    """`deltas` plus, for every absolute weight that replaces a base tensor, the dense delta trained - base."""
    _check_plain(base, where)
    base_tensors = base.state_dict()
    out = dict(deltas)
    for name, trained in absolute.items():
        original = base_tensors.get(name)
        if original is None or original.shape != trained.shape:
            have = "lacks it" if original is None else f"has it with shape {list(original.shape)}"
            raise AdapterLoadError(f"{where} replaces base tensor {name} (shape {list(trained.shape)}), but the base "
                                   f"{have}; pass the plain base model the adapter was trained on")
        dtype = torch.promote_types(torch.promote_types(torch.float32, trained.dtype), original.dtype)
        diff = trained.to(original.device, dtype) - original.to(dtype)
        if not bool(diff.any()):
            continue  # left as it was (e.g. frozen embeddings): no delta
        path, _, leaf = name.rpartition(".")
        if leaf != "weight" or diff.dim() not in (1, 2):
            raise AdapterLoadError(f"{where} changes {name}, which is not a module weight a delta can state (deltas "
                                   "update (out, in) weights and 1-D norm weights); load it with subtune.load() and "
                                   "merge it instead")
        delta = Delta.dense(diff if diff.dim() == 2 else diff.view(1, -1))
        out[path] = out[path] + delta if path in out else delta
    return out


# ----------------------------------------------------------------------------------------------- merge_deltas

@torch.no_grad()
def merge_deltas(model: nn.Module, deltas: Mapping[str, Delta]) -> nn.Module:
    """Add {module path: Delta} into a plain HF model's weights in place (each rounded once to the weight's dtype);
    returns the model. A delta of shape (1, n) updates a 1-D weight (a norm). Every path and shape is checked
    before the first weight changes."""
    guards.check_model(model, "merge_deltas")
    layer = adapter_layer(model)
    if layer:
        raise SubtuneError(f"merge_deltas merges into a plain model, but this one has adapter layers attached (e.g. "
                           f"{layer}); use subtune.merge(model) for a prepared model, or pass a fresh base")
    if not isinstance(deltas, Mapping):
        raise DeltaError(f"merge_deltas needs a mapping {{module path: Delta}}, got {type(deltas).__name__}")
    targets = {}
    for path, delta in deltas.items():
        if not isinstance(delta, Delta):
            raise DeltaError(f"{path}: expected a Delta, got {type(delta).__name__}")
        targets[path] = _weight_for(model, path, delta)
    for path, weight in targets.items():
        deltas[path].merge_into(weight)
    return model


def _check_plain(base: nn.Module, where: Any) -> None:
    layer = adapter_layer(base)
    if layer:
        raise AdapterLoadError(f"{where}: read adapters against the plain base model (this one has adapter layers "
                               f"attached, e.g. {layer}); pass a freshly loaded base")


def adapter_layer(model: nn.Module) -> str | None:
    """The path and class of the first subtune or PEFT layer in `model` (None for a plain model)."""
    for name, module in model.named_modules():
        if type(module).__module__.startswith(("subtune.", "peft.")):
            return f"{name} ({type(module).__name__})"
    return None


def _weight_for(model: nn.Module, path: Any, delta: Delta) -> torch.Tensor:
    """The (out, in) weight `delta` updates: module `path`'s weight, a 1-D weight seen as (1, n)."""
    try:
        module = model.get_submodule(path) if isinstance(path, str) else None
    except AttributeError:
        module = None
    weight = getattr(module, "weight", None) if module is not None else None
    if not isinstance(weight, torch.Tensor):
        raise DeltaError(f"the model has no module {path!r} with a weight; merge deltas into the base model they "
                         "were made for (module paths as in model.named_modules())")
    view = weight.view(1, -1) if weight.dim() == 1 else weight
    if weight.dim() not in (1, 2) or tuple(view.shape) != delta.shape:
        raise DeltaError(f"{path}: a {delta.kind} delta of shape {delta.shape} does not fit its weight of shape "
                         f"{tuple(weight.shape)}; merge deltas into the base model they were made for")
    return view
