"""The method protocol and registry. The core calls these doors and never names a method.

A method is a plug with four doors:
  select  - decide what to train (may use calibration batches); returns plain data (index tensors + JSON)
  attach  - swap chosen modules for method layers in place and freeze everything else
  hooks   - Trainer callbacks for what training needs beyond backward/step
  export  - state_dict / load_state_dict / merge / unmerge / export_lora
"""

from __future__ import annotations

from pathlib import Path
from abc import ABC, abstractmethod
from typing import Any, Iterable

import torch
from torch import nn

from subtune.core.config import MethodConfig


class Selection:
    """What a method chose to train: index tensors plus JSON-able facts (e.g. per-layer ranks). Saved with adapters."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, info: dict[str, Any] | None = None):
        self.tensors = dict(tensors or {})
        self.info = dict(info or {})


class Method(ABC):
    """Base class for methods. Override what the method needs; the defaults suit a method with nothing to select."""

    id: str = ""
    config_class: type[MethodConfig] = MethodConfig
    paper: str = ""
    default_lr: float = 2e-4  # the CLI's learning rate when --lr is not given

    def calibration_batches(self, config: MethodConfig) -> int:
        """How many calibration batches `select` reads (0: it needs no data)."""
        return 0

    def modifies_base(self, config: MethodConfig) -> bool:
        """True when `select` or `attach` change base weights in place (e.g. a residual init, warm-up updates).
        prepare/load then keep a copy of the weights while they run, so a failure can restore the model exactly.
        (Saved values named like base tensors, as in full fine-tuning, need no copy: load swaps them in by
        reference.)"""
        return False

    def select(self, model: nn.Module, config: MethodConfig, calibration: Iterable[dict] | None) -> Selection:
        return Selection()

    @abstractmethod
    def attach(self, model: nn.Module, config: MethodConfig, selection: Selection) -> None:
        """Swap the selected modules for method layers in place; leave only the method's values trainable."""

    def config_for_budget(self, model_config, trainable: int) -> MethodConfig:
        """A config that trains about `trainable` values on a model with this HF config (used by the benchmark to
        compare methods at equal budget). Methods without a budget knob return their defaults."""
        return self.config_class()

    def benchmark_variant(self, model: nn.Module, variant: str) -> None:
        """Put a prepared model in a named training phase for the benchmark (e.g. LaMDA after B is frozen)."""
        raise ValueError(f"method {self.id!r} has no benchmark variant {variant!r}")

    def callbacks(self, model: nn.Module, config: MethodConfig) -> list:
        """HF TrainerCallbacks this method needs during training (none by default)."""
        return []

    def trainer_class(self):
        """The Trainer class to train with; a plain transformers.Trainer unless the step itself differs (ZO)."""
        from transformers import Trainer

        return Trainer

    @abstractmethod
    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trained values to save (never the frozen base)."""

    @abstractmethod
    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Put saved values into a model this method was just attached to."""

    def merge(self, model: nn.Module) -> None:
        """Fold the update into the base weights in place (reversible with unmerge)."""

    def unmerge(self, model: nn.Module) -> None:
        """Undo merge."""

    def unload(self, model: nn.Module) -> None:
        """Replace method layers by plain modules holding the current (merged) weights."""

    def export_lora(self, model: nn.Module, directory: Path, max_rank: int, fallback: str = "error") -> dict[str, Any]:
        from subtune.core.errors import ExportError

        raise ExportError(
            f"method {self.id!r} has no exact LoRA form; use subtune.merge(model) and save the merged model instead")


class LayerMethod(Method):
    """A method whose trained values live in layers of one class (`layer_class`), as the parameters named in
    `value_names`. Saving, loading, merging and unloading are the same for all such methods."""

    layer_class: type[nn.Module]
    value_names: tuple[str, ...] = ("delta",)

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {name: m for name, m in model.named_modules() if isinstance(m, self.layer_class)}

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{name}.{v}": getattr(layer, v) for name, layer in self.layers(model).items()
                for v in self.value_names}

    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        from subtune.core.errors import AdapterLoadError

        layers = self.layers(model)
        expected = {f"{n}.{v}" for n in layers for v in self.value_names}
        if set(tensors) != expected:
            raise AdapterLoadError(
                f"{self.id} tensors do not match the saved selection: missing {sorted(expected - set(tensors))[:3]}, "
                f"unexpected {sorted(set(tensors) - expected)[:3]}; the adapter file is incomplete or was edited: "
                "re-save it from the trained model")
        for key in sorted(expected):  # copy_ would broadcast a wrong shape silently
            layer_name, value = key.rsplit(".", 1)
            want = getattr(layers[layer_name], value).shape
            if tensors[key].shape != want:
                raise AdapterLoadError(
                    f"{self.id} tensor {key} has shape {list(tensors[key].shape)}, the selection needs {list(want)}; "
                    "the adapter file is corrupt or was edited: re-save it from the trained model")
        with torch.no_grad():
            for name, layer in layers.items():
                for v in self.value_names:
                    getattr(layer, v).copy_(tensors[f"{name}.{v}"])

    def merge(self, model: nn.Module) -> None:
        for layer in self.layers(model).values():
            layer.merge()

    def unmerge(self, model: nn.Module) -> None:
        for layer in self.layers(model).values():
            layer.unmerge()

    def unload(self, model: nn.Module) -> None:
        from subtune.core.surgery import replace_module

        for name, layer in self.layers(model).items():
            replace_module(model, name, layer.unloaded())


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if not method.id:
        raise ValueError("a method needs a non-empty id")
    if method.id in _REGISTRY and type(_REGISTRY[method.id]) is not type(method):
        raise ValueError(f"method id {method.id!r} is already registered by {type(_REGISTRY[method.id]).__name__}")
    _REGISTRY[method.id] = method
    return method


def get_method(method_id: str) -> Method:
    _load_builtin_methods()
    from subtune.core.errors import UnknownMethodError

    try:
        return _REGISTRY[method_id]
    except (KeyError, TypeError):  # TypeError: an unhashable id such as a list
        raise UnknownMethodError(f"unknown method {method_id!r}; available methods: {sorted(_REGISTRY)} "
                                 "(see `subtune methods`)") from None


def available_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_REGISTRY)


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    from subtune.core.config import ConfigError

    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"a config needs a 'method' key; add one of {available_methods()}")
    return get_method(data["method"]).config_class.from_dict(data)


def _load_builtin_methods() -> None:
    import subtune.methods  # noqa: F401  (registers the built-in methods on import)
