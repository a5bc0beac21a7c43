"""Checks the public verbs run before any work: each bad input fails in one line that names the problem and the fix.

Kept apart from `api` so the verbs read as what they do; every function here only inspects and raises.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from subtune.core.config import ConfigError, MethodConfig
from subtune.core.errors import (
    AdapterExistsError, AdapterLoadError, AdapterSaveError, ExportError, ModelLayoutError, NonFiniteError,
)
from subtune.core.fingerprint import fingerprint_difference

FORMAT_VERSION = 2  # of adapter_config.json + adapter.safetensors (docs/FORMAT.md); older and newer are refused
FORMAT_1_RELEASES = "0.1.x"  # the releases that read format 1 (per-method tensors, written by subtune 0.1.0)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PEFT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, *PEFT_FILES)  # what a new adapter replaces in a directory
_CHUNK = 1 << 24


# ------------------------------------------------------------------------------------------------ arguments

def as_directory(directory: Any, verb: str) -> Path:
    if isinstance(directory, (str, Path)) or hasattr(directory, "__fspath__"):
        return Path(directory)
    error = AdapterLoadError if verb == "load" else AdapterSaveError
    raise error(f"subtune.{verb}() needs a directory path (str or Path), got {type(directory).__name__}")


def check_model(model: Any, verb: str) -> None:
    """A torch module with real weights (a meta-device model has shapes but no values to hash or train)."""
    if not isinstance(model, nn.Module):
        raise ModelLayoutError(f"subtune.{verb}() needs a torch nn.Module (an HF causal LM such as "
                               f"LlamaForCausalLM), got {type(model).__name__}")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise ModelLayoutError(
                f"{name} is on the meta device (the model was built without weights, e.g. under init_empty_weights "
                f"or with device_map='meta'); load its real weights before subtune.{verb}()")


def check_config_object(config: Any) -> None:
    """prepare() takes a config object; a dict or a method name gets the one-line way to build one."""
    if isinstance(config, MethodConfig):
        return
    from subtune.core.method import available_methods, get_method

    if isinstance(config, dict):
        raise ConfigError("prepare() takes a config object, not a dict; build one with "
                          f"subtune.config_from_dict({_short(config)}) or a class such as subtune.S2FTConfig(...)")
    if isinstance(config, str):
        try:
            cls = get_method(config).config_class.__name__
        except KeyError:
            raise ConfigError(f"prepare() takes a config object, got the string {config!r}, which is not a method; "
                              f"available methods: {available_methods()}") from None
        raise ConfigError(f"prepare() takes a config object, got the string {config!r}; pass subtune.{cls}() "
                          f"(or subtune.config_from_dict({{'method': {config!r}}}))")
    raise ConfigError(f"prepare() takes a config object such as subtune.S2FTConfig(...), got {type(config).__name__}")


def _short(d: dict) -> str:
    text = repr(d)
    return text if len(text) <= 60 else text[:57] + "..."


# How hints spell the options a fix needs; a caller with other spellings (the CLI: its flags) passes its own
# `option_names`, merged over these (`hint_names`).
API_NAMES = {"merged": "subtune.export_merged (or subtune.merge(model), then save_pretrained)",
             "fallback_svd": "fallback='svd'", "max_rank": "max_rank", "overwrite": "overwrite=True",
             "allow_nonfinite": "allow_nonfinite=True"}


def hint_names(option_names: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**API_NAMES, **(option_names or {})}


def check_export_args(max_rank: Any, fallback: Any, option_names: Mapping[str, str] | None = None) -> None:
    names = hint_names(option_names)
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ExportError(f"{names['max_rank']} must be an integer >= 1, got {max_rank!r}; give e.g. 512 "
                          "(vLLM's ceiling)")
    if fallback not in ("error", "svd"):
        raise ExportError(f"fallback must be 'error' or 'svd', got {fallback!r}; use {names['fallback_svd']} for an "
                          f"approximate export of modules above {names['max_rank']}")


# ---------------------------------------------------------------------------------------------- finite values

def first_nonfinite(tensors: dict[str, torch.Tensor]) -> tuple[str, int, int] | None:
    """(name, bad count, size) of the first floating tensor holding NaN or inf, checked in chunks (no big copies)."""
    for name, t in tensors.items():
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        bad = 0
        for start in range(0, flat.numel(), _CHUNK):
            bad += int((~torch.isfinite(flat[start:start + _CHUNK])).sum())
        if bad:
            return name, bad, flat.numel()
    return None


def check_finite(tensors: dict[str, torch.Tensor], verb: str, where: str = "",
                 option_names: Mapping[str, str] | None = None) -> None:
    found = first_nonfinite(tensors)
    if found:
        name, bad, total = found
        raise NonFiniteError(
            f"{where}tensor {name} holds {bad} NaN/inf value(s) of {total}: training diverged. Lower the learning "
            f"rate and retrain (or pass {hint_names(option_names)['allow_nonfinite']} to {verb} it anyway)")


# ------------------------------------------------------------------------------------------- adapter_config.json

_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "method": (str,), "config": (dict,), "fingerprint": (dict,), "adapter_sha256": (str,), "selection": (dict,),
    "subtune_version": (str,), "format_version": (int,), "base_parameters": (int,),
    "base_model_name_or_path": (str, type(None)), "base_changed": (bool,), "deltas": (dict,), "subtune_base": (str,),
}
REQUIRED = ("method", "config", "fingerprint", "adapter_sha256", "base_changed")


def check_adapter_config(cfg: Any, path: Path, current_version: str) -> None:
    """Refuse an adapter_config.json that is not a subtune adapter of a version this subtune can read."""
    if not isinstance(cfg, dict):
        raise AdapterLoadError(f"{path} holds a JSON {type(cfg).__name__}, not an object; it was not written by "
                               "subtune.save(): re-save the adapter")
    if "peft_type" in cfg and "method" not in cfg:
        raise AdapterLoadError(f"{path} is a PEFT {cfg['peft_type']} adapter, not a subtune adapter; load it with "
                               "peft.PeftModel.from_pretrained(base, directory)")
    for key, types in _FIELD_TYPES.items():
        value = cfg.get(key)
        if key in cfg and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise AdapterLoadError(f"{path}: field {key!r} must be a JSON {want}, got {value!r}; the file is corrupt "
                                   "or was edited: re-save the adapter")
    if "method" in cfg:  # versions first: an adapter of another format lacks this format's fields
        check_versions(cfg, path, current_version)
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise AdapterLoadError(f"{path} lacks {missing}; it was not written by subtune.save(): re-save the adapter")
    if not re.fullmatch(r"[0-9a-f]{64}", cfg["adapter_sha256"]):
        raise AdapterLoadError(f"{path}: adapter_sha256 is not a sha256 hex digest; re-save the adapter")


def check_versions(cfg: dict, path: Path, current_version: str) -> None:
    """A newer format, or a newer subtune major version, may mean things this version would read wrongly."""
    fmt = cfg.get("format_version", 1)  # adapters written before format_version existed are format 1
    written = cfg.get("subtune_version")
    if fmt > FORMAT_VERSION:
        raise AdapterLoadError(f"{path} has format_version {fmt}, newer than this subtune {current_version} reads "
                               f"(format {FORMAT_VERSION}); upgrade subtune to the version that wrote it "
                               f"({written or 'unknown'})")
    if fmt == 1:
        raise AdapterLoadError(f"{path} was written by subtune {written or '0.1.0'} in format 1: load it with subtune "
                               f"{FORMAT_1_RELEASES}, or re-train (this subtune {current_version} reads format "
                               f"{FORMAT_VERSION}, docs/FORMAT.md)")
    if fmt < 1:
        raise AdapterLoadError(f"{path}: format_version {fmt} is not a subtune format; the file is corrupt or was "
                               "edited: re-save the adapter")
    if written is None:
        return
    try:
        major = int(written.split(".")[0])
    except ValueError:
        raise AdapterLoadError(f"{path}: subtune_version {written!r} is not a version number; re-save the "
                               "adapter") from None
    if major > int(current_version.split(".")[0]):
        raise AdapterLoadError(f"{path} was written by subtune {written}, a newer major version than this subtune "
                               f"{current_version}; install subtune>={major}.0 to load it")


# ---------------------------------------------------------------------------------------------- no clobbering

def _existing_config(directory: Path) -> tuple[str, Any]:
    """('none' | 'unreadable' | 'json', value) for the adapter_config.json in `directory`."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        return "none", None
    try:
        return "json", json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError):
        return "unreadable", None


def check_save_target(directory: Path, method_id: str, fp: dict[str, Any]) -> None:
    """Refuse to replace an adapter of another method, format or base model (a newer save of the same run is fine)."""
    fix = "choose another directory or pass overwrite=True to replace it"
    if directory.exists() and not directory.is_dir():
        raise AdapterSaveError(f"{directory} is a file, not a directory; pass a directory path")
    kind, cfg = _existing_config(directory)
    if kind == "none":
        stray = [f for f in (WEIGHTS_FILE, *PEFT_FILES) if (directory / f).exists()]
        if stray:
            raise AdapterExistsError(f"{directory} holds {stray[0]} without an adapter_config.json; {fix}")
        return
    if kind == "unreadable" or not isinstance(cfg, dict):
        raise AdapterExistsError(f"{directory} holds an adapter_config.json subtune cannot read; {fix}")
    if "method" not in cfg:
        what = f"a PEFT {cfg['peft_type']} adapter" if "peft_type" in cfg else "another program's adapter"
        raise AdapterExistsError(f"{directory} holds {what}; saving a {method_id!r} adapter there would replace it: "
                                 f"{fix}")
    if cfg["method"] != method_id:
        raise AdapterExistsError(f"{directory} holds a {cfg['method']!r} adapter; saving a {method_id!r} adapter "
                                 f"there would replace it: {fix}")
    saved = cfg.get("fingerprint")
    diff = fingerprint_difference(saved, fp) if isinstance(saved, dict) else "no readable fingerprint"
    if diff:
        raise AdapterExistsError(f"{directory} holds a {method_id!r} adapter of another base model ({diff}); "
                                 f"saving there would replace it: {fix}")


def check_export_target(directory: Path, what: str = "a LoRA export",
                        option_names: Mapping[str, str] | None = None) -> None:
    """An export (`what`) may replace an earlier export, never a subtune adapter (its own training result)."""
    if directory.exists() and not directory.is_dir():
        raise AdapterSaveError(f"{directory} is a file, not a directory; pass a directory path")
    kind, cfg = _existing_config(directory)
    fix = f"export to another directory or pass {hint_names(option_names)['overwrite']} to replace it"
    if kind == "unreadable":
        raise AdapterExistsError(f"{directory} holds an adapter_config.json subtune cannot read; {fix}")
    if (kind == "json" and isinstance(cfg, dict) and "method" in cfg) or (directory / WEIGHTS_FILE).exists():
        raise AdapterExistsError(f"{directory} holds a subtune adapter; {what} there would replace it: {fix}")
