"""Atomic, pickle-free file writes and reads (safetensors + JSON)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from subtune.core.errors import AdapterLoadError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically; returns its sha256 so a config can vouch for it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        digest = sha256_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise AdapterLoadError(f"{path} is missing; point to a directory written by subtune.save()")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path} is not valid JSON ({e}); re-save the adapter") from None


def read_tensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise AdapterLoadError(f"{path} is missing; point to a directory written by subtune.save()")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise AdapterLoadError(
            f"{path} does not match the checksum in adapter_config.json (truncated or overwritten); re-save it")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged header or body
        raise AdapterLoadError(f"{path} is not a readable safetensors file ({e}); re-save the adapter") from None
