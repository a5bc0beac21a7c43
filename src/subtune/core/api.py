"""The public verbs: prepare, save, load, merge, unmerge, unload, export_lora, trainable_summary.

They work on an ordinary HF causal LM and dispatch to the method named in the config; none of them knows a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from subtune import __version__
from subtune.core import io
from subtune.core.config import MethodConfig
from subtune.core.errors import AdapterLoadError, SubtuneError
from subtune.core.fingerprint import check_fingerprint, fingerprint
from subtune.core.method import Method, Selection, get_method
from subtune.core.surgery import decoder_layers, freeze

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
SELECTION_PREFIX = "selection."
STATE_ATTR = "subtune_state"


@dataclass
class AdapterState:
    """What subtune keeps on a prepared model (as `model.subtune_state`)."""

    method: Method
    config: MethodConfig
    selection: Selection
    fingerprint: dict[str, Any]
    base_parameters: int
    base_name: str
    merged: bool = False


def state_of(model: nn.Module) -> AdapterState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise SubtuneError("this model has no subtune method attached; call subtune.prepare() or subtune.load() first")
    return state


def prepare(model: nn.Module, config: MethodConfig, calibration: Iterable[dict] | None = None) -> nn.Module:
    """Attach `config`'s method to `model` in place and freeze everything else. Returns the same model."""
    if getattr(model, STATE_ATTR, None) is not None:
        raise SubtuneError(
            f"this model already has {state_of(model).method.id!r} attached; start again from a fresh base model")
    method = get_method(config.method)
    config.validate()
    decoder_layers(model)
    if method.calibration_batches(config) and calibration is None:
        raise SubtuneError(
            f"method {method.id!r} selects what to train from data: pass calibration=<iterable of batches> "
            "(dicts with input_ids, attention_mask, labels)")
    state = _attach_state(model, method, config, Selection())  # the fingerprint is taken before any change
    try:
        state.selection = method.select(model, config, calibration)
        freeze(model)
        method.attach(model, config, state.selection)
    except BaseException:
        delattr(model, STATE_ATTR)  # a failed prepare leaves no half-attached state behind
        raise
    return model


def _attach_state(model, method, config, selection) -> AdapterState:
    state = AdapterState(
        method=method, config=config, selection=selection, fingerprint=fingerprint(model),
        base_parameters=sum(p.numel() for p in model.parameters()),
        base_name=str(getattr(model.config, "_name_or_path", "") or ""),
    )
    setattr(model, STATE_ATTR, state)
    return state


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write `adapter_config.json` + `adapter.safetensors` (trained values, selection indices, base fingerprint)."""
    state = state_of(model)
    directory = Path(directory)
    tensors = {k: v for k, v in state.method.state_dict(model).items()}
    tensors.update({SELECTION_PREFIX + k: v for k, v in state.selection.tensors.items()})
    digest = io.atomic_save_tensors(directory / WEIGHTS_FILE, tensors, metadata={"format": "subtune"})
    io.atomic_write_json(directory / CONFIG_FILE, {
        "subtune_version": __version__,
        "method": state.method.id,
        "config": state.config.to_dict(),
        "selection": state.selection.info,
        "fingerprint": state.fingerprint,
        "base_model_name_or_path": state.base_name,
        "base_parameters": state.base_parameters,
        "adapter_sha256": digest,
    })
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterLoadError(f"adapter directory {directory} does not exist; pass a directory written by subtune.save()")
    cfg = io.read_json(directory / CONFIG_FILE)
    missing = [k for k in ("method", "config", "fingerprint", "adapter_sha256") if k not in cfg]
    if missing:
        raise AdapterLoadError(f"{directory / CONFIG_FILE} lacks {missing}; it was not written by subtune.save()")
    return cfg


def load(model: nn.Module, directory: str | Path) -> nn.Module:
    """Attach a saved adapter to a fresh copy of the base it was trained on. Checks everything before changing `model`."""
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    if getattr(model, STATE_ATTR, None) is not None:
        raise SubtuneError("this model already has a subtune method attached; load onto a fresh base model")
    try:
        method = get_method(cfg["method"])
    except KeyError as e:
        raise AdapterLoadError(f"{directory}: {e.args[0]}") from None
    config = method.config_class.from_dict(cfg["config"])
    check_fingerprint(cfg["fingerprint"], model, directory)
    tensors = io.read_tensors(directory / WEIGHTS_FILE, cfg["adapter_sha256"])
    selection = Selection(
        {k[len(SELECTION_PREFIX):]: v for k, v in tensors.items() if k.startswith(SELECTION_PREFIX)},
        cfg.get("selection", {}),
    )
    values = {k: v for k, v in tensors.items() if not k.startswith(SELECTION_PREFIX)}
    state = _attach_state(model, method, config, selection)
    state.base_name = cfg.get("base_model_name_or_path", state.base_name)
    freeze(model)
    method.attach(model, config, selection)
    method.load_state_dict(model, values)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold the trained update into the base weights in place; `unmerge` undoes it."""
    state = state_of(model)
    if not state.merged:
        state.method.merge(model)
        state.merged = True
    return model


def unmerge(model: nn.Module) -> nn.Module:
    state = state_of(model)
    if state.merged:
        state.method.unmerge(model)
        state.merged = False
    return model


def unload(model: nn.Module) -> nn.Module:
    """Merge, then replace method layers with plain modules: returns a plain HF model with no subtune state."""
    state = state_of(model)
    merge(model)
    state.method.unload(model)
    delattr(model, STATE_ATTR)
    return model


def export_lora(model: nn.Module, directory: str | Path, max_rank: int = 512, fallback: str = "error"
                ) -> dict[str, Any]:
    """Write a PEFT LoRA adapter equal to the trained update, where the method's update is exactly low-rank.

    A module needing a rank above `max_rank` (vLLM's ceiling is 512) raises ExportError, or with fallback="svd" is
    exported as its best rank-`max_rank` approximation (the returned dict reports each relative error).
    """
    state = state_of(model)
    return state.method.export_lora(model, Path(directory), max_rank, fallback)


@dataclass
class TrainableSummary:
    trainable: int
    base: int
    optimizer_state_bytes: int  # AdamW: two fp32 moments per trainable value (none for zeroth-order methods)
    gradient_bytes: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.base, 1)

    def __str__(self) -> str:
        return (f"trainable {self.trainable:,} / base {self.base:,} ({self.percent:.4f}%), "
                f"AdamW state {self.optimizer_state_bytes / 2**20:.2f} MiB, grads {self.gradient_bytes / 2**20:.2f} MiB")


def trainable_summary(model: nn.Module) -> TrainableSummary:
    trainable = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trainable)
    state = getattr(model, STATE_ATTR, None)
    base = state.base_parameters if state else sum(p.numel() for p in model.parameters())
    zeroth_order = bool(state and getattr(state.method, "zeroth_order", False))  # SPSA keeps no optimizer state
    return TrainableSummary(
        trainable=n, base=base, optimizer_state_bytes=0 if zeroth_order else 8 * n,
        gradient_bytes=0 if zeroth_order else sum(p.numel() * p.element_size() for p in trainable),
    )
