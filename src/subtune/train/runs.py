"""Run directories: what a run leaves on disk, when a checkpoint is complete, and which run a resume may continue.

A run directory holds `adapter/` (the final adapter) and `checkpoint-N/` folders written by the Trainer. A
checkpoint counts as complete only once `subtune_checkpoint.json` is in it: it is written last (atomically, after
every other file of the checkpoint is flushed to disk) and lists each file with its size, so a checkpoint killed
mid-write, or truncated later, is recognised and skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from subtune import __version__
from subtune.core import io
from subtune.core.config import ConfigError, MethodConfig
from subtune.core.errors import AdapterLoadError, AdapterSaveError, CheckpointError, RunExistsError

COMPLETE_FILE = "subtune_checkpoint.json"
ADAPTER_DIR = "adapter"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")

CLI_NAMES = {"resume": "--resume", "overwrite": "--overwrite", "output": "--output", "method": "--method "}
API_NAMES = {"resume": "resume=True", "overwrite": "overwrite=True", "output": "output_dir", "method": "method "}


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint-N directory, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir()
             if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name))]
    return sorted(found)


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != COMPLETE_FILE and not p.name.endswith(".tmp")}


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def mark_complete(folder: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Declare a checkpoint complete: flush its files, then write the marker that lists them (atomically)."""
    folder = Path(folder)
    files = _files(folder)
    for rel in files:
        _fsync(folder / rel)
    io.atomic_write_json(folder / COMPLETE_FILE, {"subtune_version": __version__, "files": files, **(extra or {})})


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / COMPLETE_FILE
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None


def incomplete_reason(folder: str | Path) -> str | None:
    """None for a complete checkpoint, else why it is not one."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return f"no readable {COMPLETE_FILE}: it was killed while being written"
    for rel, size in marker["files"].items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, not {size}"
    return None


def find_resume_checkpoint(output_dir: str | Path, explicit: str | Path | None = None,
                           names: dict[str, str] = API_NAMES) -> tuple[Path, list[Path]]:
    """The checkpoint to resume from (the newest complete one, or `explicit`), and the incomplete checkpoints newer
    than it (warned about; they are garbage and get removed when training starts)."""
    if explicit is not None:
        folder = Path(explicit)
        reason = incomplete_reason(folder) if folder.is_dir() else "it does not exist"
        if reason:
            raise CheckpointError(f"cannot resume from {folder}: {reason}; resume from a complete checkpoint-N, or "
                                  f"pass {names['resume']} to pick the newest complete one")
        return folder, []
    found = checkpoints(output_dir)
    if not found:
        raise CheckpointError(f"{names['resume']}: {output_dir} holds no checkpoint-* directory; train without "
                              f"{names['resume']} to start a new run (with {names['overwrite']} to replace what is "
                              "there)")
    partial = []
    for _, folder in reversed(found):
        reason = incomplete_reason(folder)
        if reason is None:
            for p in partial:
                warnings.warn(f"{p} is incomplete ({incomplete_reason(p)}); resuming from {folder.name} instead "
                              f"(the newest complete checkpoint), and {p.name} will be removed", stacklevel=3)
            return folder, partial
        partial.append(folder)
    raise CheckpointError(f"{names['resume']}: no checkpoint in {output_dir} is complete ({partial[0].name}: "
                          f"{incomplete_reason(partial[0])}); train without {names['resume']} in another "
                          f"{names['output']}, or pass {names['overwrite']} to start this run again")


def _adapter_config(checkpoint: Path) -> dict[str, Any]:
    from subtune.core.api import read_adapter_config

    try:
        return read_adapter_config(checkpoint / ADAPTER_DIR)
    except AdapterLoadError as e:
        raise CheckpointError(f"cannot resume from {checkpoint}: {e}") from None


def _json_form(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def check_resume_config(checkpoint: Path, config: MethodConfig, names: dict[str, str] = API_NAMES) -> None:
    """Refuse to continue a run of another method, or with a config whose fields differ (they change what is
    trained: the selection, the ranks, the schedule)."""
    saved = _adapter_config(checkpoint)
    if saved["method"] != config.method:
        raise CheckpointError(f"{names['resume']}: {checkpoint} is a {saved['method']!r} run, not {config.method!r}; "
                              f"resume with {names['method']}{saved['method']}, or start a new run in another "
                              f"{names['output']}")
    then, now = _json_form(saved["config"]), _json_form(config.to_dict())
    diff = sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k))
    if diff:
        fields = ", ".join(f"{k} ({then.get(k)!r} in the checkpoint, {now.get(k)!r} now)" for k in diff)
        raise CheckpointError(f"{names['resume']}: the {config.method} config differs from {checkpoint.name}'s in "
                              f"{fields}; resume with the run's values (see {checkpoint / ADAPTER_DIR}"
                              f"/adapter_config.json), or start a new run in another {names['output']}")


def check_resume_selection(model, checkpoint: Path) -> None:
    """After `prepare`: the base and what was selected must be the checkpoint's, or its values would land in other
    channels/blocks. Selection can depend on data (SMT's warm-up, gradient strategies), so it is compared itself."""
    from subtune.core import api

    saved = _adapter_config(checkpoint)
    state = api.state_of(model)
    from subtune.core.fingerprint import fingerprint_difference

    diff = fingerprint_difference(saved["fingerprint"], state.fingerprint)
    if diff:
        raise CheckpointError(f"cannot resume: the base model differs from the one {checkpoint} was trained on "
                              f"({diff}); resume with the run's model")
    tensors = io.read_tensors(checkpoint / ADAPTER_DIR / api.WEIGHTS_FILE, saved["adapter_sha256"])
    prefix = api.SELECTION_PREFIX
    then_sel = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    now_sel = state.selection.tensors
    differ = sorted(k for k in then_sel.keys() | now_sel.keys()
                    if k not in then_sel or k not in now_sel or not torch.equal(then_sel[k], now_sel[k].cpu()))
    if differ or _json_form(saved.get("selection", {})) != _json_form(state.selection.info):
        where = ", ".join(differ[:3]) or "selection info"
        raise CheckpointError(f"cannot resume: what the method selects now differs from {checkpoint.name}'s "
                              f"({where}), so its values would train other weights; resume with the run's data, "
                              f"model and config")


def run_contents(output_dir: str | Path) -> list[str]:
    """The names of another run's artefacts in `output_dir` (its adapter, its checkpoints)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    adapter = [ADAPTER_DIR] if (output_dir / ADAPTER_DIR).is_dir() else []
    return adapter + [p.name for _, p in checkpoints(output_dir)]


def check_writable(path: str | Path, name: str) -> None:
    """Fail now, not after training, when the output cannot be created or written. Creates nothing."""
    try:
        io.check_writable(path, what=name)
    except AdapterSaveError as e:
        raise ConfigError(f"{name}: {e}") from None


def check_output_dir(output_dir: str | Path, *, resume: bool, overwrite: bool, any_run: bool,
                     names: dict[str, str] = API_NAMES) -> None:
    """Refuse to start a run over another one. With `any_run` (the CLI) an adapter/ or any checkpoint-* counts;
    without (the Python API, which the demo reruns into the same folders) only checkpoints do, and the final save
    refuses an adapter of another method or base model, as `subtune.save` does (the caller checks that up front)."""
    output_dir = Path(output_dir)
    if resume and overwrite:
        raise ConfigError(f"{names['resume']} continues the run in {output_dir} and {names['overwrite']} replaces "
                          f"it; give one of them")
    check_writable(output_dir, names["output"])
    if resume or overwrite:
        return
    contents = run_contents(output_dir)
    if not any_run:
        contents = [c for c in contents if c != ADAPTER_DIR]
    if contents:
        raise RunExistsError(f"{output_dir} already holds another run ({', '.join(contents[:4])}); pass "
                             f"{names['resume']} to continue it, {names['overwrite']} to replace it, or choose "
                             f"another {names['output']}")


def remove_checkpoints(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
