"""Serving many fine-tuned variants on one base model (issue #12).

`AdapterStore(base)` keeps adapters as deltas beside the one shared base (`add`, `add_deltas`, `remove`, `names`,
`memory`), switches by scatter (`activate(name | None)`), fuses by summing deltas (`fuse`), and routes each row of a
batch to its own adapter (`generate`, `logits`). Everything is written over `subtune.core.deltas`, never over a
method's training layers.

`subtune.serve.http` (`create_app`, `serve`; `subtune serve` on the command line) puts an OpenAI-compatible HTTP
server in front of a store, batching concurrent requests across adapters. It needs the `serve` extra (fastapi,
uvicorn), so it is imported on its own, not from here.
"""

from subtune.serve.batched import RowGroups, routed
from subtune.serve.errors import (
    AdapterActiveError, AdapterMismatchError, AdapterNameError, DuplicateAdapterError, RoutingError, ServeError,
    UnknownAdapterError, WrongBaseError,
)
from subtune.serve.store import AdapterStore

__all__ = [
    "AdapterStore", "RowGroups", "routed", "ServeError", "AdapterNameError", "DuplicateAdapterError",
    "UnknownAdapterError", "WrongBaseError", "AdapterMismatchError", "AdapterActiveError", "RoutingError",
]
