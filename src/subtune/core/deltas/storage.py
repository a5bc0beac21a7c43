"""Deltas in files: per module its kind, indices and values, readable with no method code.

A set of deltas {module path: Delta} becomes safetensors tensors named `delta.<module path>.<field>` (fields per kind:
columns/rows `index`, `values`; blocks `row_blocks`, `col_blocks`, `values`; sparse `flat_index`, `values`; lowrank
`A`, `B`; dense `values`) plus a JSON table {module path: {"kind", "shape", and "block_size" or "scale"}}. The table
can live in `adapter_config.json` (`deltas_to_tensors` / `deltas_from_tensors`) or in the safetensors header itself
under the key "subtune.deltas" (`write_delta_file` / `read_delta_file`), which makes one file self-describing.
Other tensors (a method's state for resuming training) may share the file outside the `delta.` namespace.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open

from subtune.core import io
from subtune.core.deltas.kinds import Delta, DeltaError
from subtune.core.errors import AdapterLoadError

DELTA_PREFIX = "delta."
DELTA_METADATA_KEY = "subtune.deltas"


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (two modules with one index, a delta's A that is also method
    state): later ones are copied."""
    seen, out = set(), {}
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def deltas_to_tensors(deltas: Mapping[str, Delta], prefix: str = DELTA_PREFIX
                      ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(tensors, table): the tensors of every delta under `prefix + module path`, and the JSON-able table."""
    tensors, table = {}, {}
    for name, delta in deltas.items():
        if not isinstance(name, str) or not name:
            raise DeltaError(f"module paths must be non-empty strings, got {name!r}")
        if not isinstance(delta, Delta):
            raise DeltaError(f"{name}: expected a Delta, got {type(delta).__name__}")
        tensors.update(delta.to_tensors(prefix + name))
        table[name] = delta.meta()
    return _unshared(tensors), table


def deltas_from_tensors(tensors: Mapping[str, torch.Tensor], table: Mapping, prefix: str = DELTA_PREFIX,
                        check_finite: bool = True) -> dict[str, Delta]:
    """Read back `deltas_to_tensors`' output, checked: every table row must find valid tensors, and every tensor
    under `prefix` must belong to a row (AdapterLoadError otherwise, naming the module and the fix)."""
    if not isinstance(table, Mapping):
        raise AdapterLoadError(f"the delta table must be a JSON object {{module path: meta}}, got "
                               f"{type(table).__name__}; re-save the adapter with subtune.save()")
    deltas, used = {}, set()
    for name, meta in table.items():
        deltas[name] = Delta.from_tensors(prefix + name, tensors, meta, check_finite=check_finite)
        used.update(f"{prefix}{name}.{field}" for field in deltas[name].tensor_fields)
    orphans = sorted(k for k in tensors if k.startswith(prefix) and k not in used)
    if orphans:
        raise AdapterLoadError(f"{len(orphans)} delta tensor(s) have no row in the delta table (first: "
                               f"{orphans[0]!r}): the file and its table come from different saves; re-save the "
                               "adapter with subtune.save()")
    return deltas


def write_delta_file(path: Path, deltas: Mapping[str, Delta], extra: Mapping[str, torch.Tensor] | None = None,
                     prefix: str = DELTA_PREFIX) -> str:
    """Write the deltas (and `extra` tensors outside `prefix`) to one self-describing safetensors file, atomically.
    Returns its sha256."""
    tensors, table = deltas_to_tensors(deltas, prefix)
    extra = dict(extra or {})
    clashing = sorted(k for k in extra if k.startswith(prefix))
    if clashing:
        raise DeltaError(f"extra tensor {clashing[0]!r} is inside the delta namespace {prefix!r}; name it "
                         "outside it (e.g. 'state.<name>')")
    # one header key only: safetensors writes its metadata map in a random order, and equal adapters must be
    # byte-identical files
    metadata = {DELTA_METADATA_KEY: json.dumps(table, sort_keys=True, allow_nan=False)}
    return io.atomic_save_tensors(Path(path), _unshared({**tensors, **extra}), metadata=metadata)


def read_delta_file(path: Path, expected_sha256: str | None = None, prefix: str = DELTA_PREFIX,
                    check_finite: bool = True) -> tuple[dict[str, Delta], dict[str, torch.Tensor]]:
    """(deltas, other tensors) from a file `write_delta_file` wrote; refuses a damaged or foreign file."""
    path = Path(path)
    tensors = io.read_tensors(path, expected_sha256)  # missing, checksum and damaged-body errors
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if DELTA_METADATA_KEY not in metadata:
        raise AdapterLoadError(f"{path} holds no delta table (header key {DELTA_METADATA_KEY!r}); it was not "
                               "written by subtune's write_delta_file: re-save the adapter with subtune.save()")
    try:
        table = json.loads(metadata[DELTA_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path}: the delta table is not valid JSON ({e}); re-save the adapter") from None
    deltas = deltas_from_tensors(tensors, table, prefix, check_finite)
    return deltas, {k: v for k, v in tensors.items() if not k.startswith(prefix)}
