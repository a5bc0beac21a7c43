"""Where an adapter's base model lives, recorded so a reader finds it from any working directory (docs/FORMAT.md).

A base typed as a relative path (`models/tiny-llama`) means nothing from another directory, and an id such as
`default` means nothing to PEFT. So an adapter records `base_model_name_or_path` as the resolved absolute path of a
local base directory, and for a base that subtune ships (the embedded default model, registered by `subtune.zoo`)
also `subtune_base`, its id: another install or checkout then finds its own copy even if the recorded path is gone.
Anything that is not a directory here (a hub id, a test model's name) is recorded as given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from subtune.core.errors import ModelNotFoundError

_NAMED: dict[str, Path] = {}  # id -> directory of the bases subtune ships


def register_named_base(name: str, directory: str | os.PathLike) -> None:
    """Make `name` (e.g. "default") stand for the model directory `directory` in adapters and their readers."""
    _NAMED[name] = Path(directory).resolve()


def named_base_directory(name: str) -> Path | None:
    return _NAMED.get(name)


def _named_id_of(directory: Path) -> str | None:
    return next((name for name, path in _NAMED.items() if path == directory), None)


def canonical_name(name_or_path: str) -> str:
    """A registered id stays as it is; an existing local directory becomes its absolute path (or the id of the
    shipped base it is); anything else is kept as given."""
    if not name_or_path or name_or_path in _NAMED:
        return name_or_path
    path = Path(name_or_path)
    if not path.is_dir():
        return name_or_path
    resolved = path.resolve()
    return _named_id_of(resolved) or str(resolved)


def base_record(name_or_path: str) -> dict[str, Any]:
    """The adapter_config.json fields naming the base: `base_model_name_or_path` (an absolute directory where
    there is one) and, for a shipped base, `subtune_base` (its id)."""
    name = canonical_name(name_or_path)
    if name in _NAMED:
        return {"base_model_name_or_path": str(_NAMED[name]), "subtune_base": name}
    return {"base_model_name_or_path": name or None}


def base_path_for_peft(name_or_path: str) -> str | None:
    """What an exported PEFT adapter's `base_model_name_or_path` holds: the base's absolute directory when it has
    one, so `AutoPeftModelForCausalLM.from_pretrained(export)` opens it offline."""
    return base_record(name_or_path)["base_model_name_or_path"]


def base_of_adapter(cfg: dict[str, Any], directory: str | os.PathLike = "") -> str:
    """The base to load for an adapter whose adapter_config.json is `cfg`: its shipped base's id (this install's
    copy), else its recorded directory. Refuses a recorded base that is not a model directory from here (an
    adapter saved before paths were recorded absolute holds the name as typed then)."""
    named = cfg.get("subtune_base")
    if isinstance(named, str) and named in _NAMED:
        return named
    recorded = cfg.get("base_model_name_or_path")
    if not recorded or recorded in _NAMED:
        return recorded or "default"
    if not (Path(recorded) / "config.json").is_file():
        where = f" in {directory}" if directory else ""
        raise ModelNotFoundError(f"the adapter{where} was trained on {recorded!r}, which is not a model directory "
                                 f"from {os.getcwd()}; pass its base explicitly (CLI: --model DIR)")
    return recorded
