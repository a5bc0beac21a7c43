"""The method-neutral update record.

Every method can state its trained update per target module as a `Delta` in the base weight's own (out, in)
coordinates; saving, loading, merging, LoRA export, fusion and serving are written once per kind over deltas, so
reading, merging or serving an adapter needs no method code.

- `kinds`: the record itself, `Delta.columns | rows | blocks | sparse | lowrank | dense(...)`, with `to_dense`,
  `apply`, `merge_into` / `unmerge_from`, `to_lora`, `scaled`, `+`, `to_tensors` / `meta` / `Delta.from_tensors`.
- `storage`: a set of deltas {module path: Delta} in tensors + a JSON table, or in one self-describing file.
- `combine`: `fuse` (weighted sums) and `lora_factors` (a whole adapter as PEFT LoRA factors).
"""

from subtune.core.deltas.combine import fuse, lora_factors
from subtune.core.deltas.kinds import (
    KINDS, BlocksDelta, ColumnsDelta, Delta, DeltaError, DenseDelta, LowRankDelta, RowsDelta, SparseDelta,
)
from subtune.core.deltas.storage import (
    DELTA_METADATA_KEY, DELTA_PREFIX, deltas_from_tensors, deltas_to_tensors, read_delta_file, write_delta_file,
)

__all__ = [
    "Delta", "DeltaError", "KINDS", "ColumnsDelta", "RowsDelta", "BlocksDelta", "SparseDelta", "LowRankDelta",
    "DenseDelta", "fuse", "lora_factors", "deltas_to_tensors", "deltas_from_tensors", "write_delta_file",
    "read_delta_file", "DELTA_PREFIX", "DELTA_METADATA_KEY",
]
