"""The method protocol and registry. The core calls these doors and never names a method.

A method is a plug with four doors:
  select  - decide what to train (may use calibration batches); returns plain data (index tensors + JSON)
  attach  - swap chosen modules for method layers in place and freeze everything else
  hooks   - Trainer callbacks for what training needs beyond backward/step
  export  - deltas (the trained update per module, `subtune.core.deltas.Delta`), training_state (what resuming
            training needs beyond the deltas), restore (put both back after attach), merge / unmerge / unload.
            Saving, loading, reading and LoRA export are generic over deltas (core/api.py, docs/FORMAT.md).

Everything else the core, the trainers, the benchmark, the demo and the CLI need from a method is a member declared
on `Method` below with a default (zeroth_order, zo_tensors, exact_restore, objective, calibration_source,
trainer_class, callbacks, own_base_floor, bench_reference, demo, ...): callers read members, never probe for them
with getattr, and never compare method ids. Members that need the adapter state receive it as an argument
(`state: AdapterState`); a method never reads it off the model. See docs/DESIGN.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from torch import nn

from subtune.core.config import MethodConfig
from subtune.core.deltas import Delta

if TYPE_CHECKING:
    from subtune.core.api import AdapterState


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

    # -- what the trainers, the benchmark and the demo ask of a method: all declared here, nothing is probed for
    zeroth_order: bool = False
    """Trained by forward-only SPSA steps (train/zo.py: `zo_tensors` perturbed in place, no backward, no optimizer
    state) instead of backpropagation."""
    exact_restore: bool = True
    """Zeroth-order only: copy the perturbed tensors back after each probe (exact; costs one copy of them). False
    restores by regenerating the noise, as MeZO does for the whole model."""
    own_base_floor: bool = False
    """The benchmark also measures the floors on the model this method prepared (SensZOQ's 4-bit base): its
    step is compared with inference on the same base."""
    bench_reference: str | None = None
    """The column label under which the benchmark compares every method with this one ("full", "LoRA"); None:
    not a reference."""
    demo: dict[str, Any] | None = None
    """`subtune demo`'s settings on the embedded model: {"lr": float, "config": {field: value}, "steps_factor":
    int}. Methods without it are left out of the default demo (and trained at `default_lr` when named)."""

    def calibration_batches(self, config: MethodConfig) -> int:
        """How many calibration batches `select` reads (0: it needs no data)."""
        return 0

    def calibration_source(self, config: MethodConfig) -> str:
        """Where those batches come from: "train" (the first training batches, e.g. SMT's warm-up) or "corpus"
        (general text, SensZOQ's sensitivity as in the paper)."""
        return "train"

    def objective(self, config: MethodConfig) -> str:
        """The training loss: "lm" (next-token cross-entropy on the answer) or "choice" (cross-entropy over the
        candidate answers of multiple-choice records, MeZO's objective)."""
        return "lm"

    def zo_tensors(self, model: nn.Module, state: AdapterState) -> list[torch.Tensor]:
        """Zeroth-order only: the tensors a ZO step perturbs and updates in place, in a fixed order (the noise of a
        seed is drawn for them in this order)."""
        from subtune.core.errors import SubtuneError

        raise SubtuneError(f"method {self.id!r} is trained by backpropagation, not zeroth-order: it has no tensors "
                           "for a ZO step; train it with its own trainer_class()")

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

    def trainable_values(self, model: nn.Module, state: AdapterState) -> int:
        """How many values training can change (`trainable_summary`): every entry of the trainable parameters,
        unless some are storage only (SMT's ragged edge blocks pad to b×b; the padding never reaches the output)."""
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def config_for_budget(self, model_config, trainable: int) -> MethodConfig:
        """A config that trains about `trainable` values on a model with this HF config (used by the benchmark to
        compare methods at equal budget). Methods without a budget knob return their defaults."""
        return self.config_class()

    def benchmark_variant(self, model: nn.Module, variant: str) -> None:
        """Put a prepared model in a named training phase for the benchmark (e.g. LaMDA after B is frozen)."""
        from subtune.core.config import ConfigError

        raise ConfigError(f"method {self.id!r} has no benchmark variant {variant!r}; drop '@{variant}'")

    def selection_summary(self, model: nn.Module, state: AdapterState) -> str | None:
        """One compact line (or a few) saying what `select` chose, printed once by `subtune train` (e.g. LaMDA++'s
        per-layer ranks); None: nothing worth printing."""
        return None

    def callbacks(self, model: nn.Module, state: AdapterState) -> list:
        """HF TrainerCallbacks this method needs during training (none by default)."""
        return []

    def trainer_class(self):
        """The Trainer class to train with; a plain transformers.Trainer unless the step itself differs (ZO)."""
        from transformers import Trainer

        return Trainer

    # -- the update record: what save writes, read_deltas reads and export_lora exports (docs/FORMAT.md)
    @abstractmethod
    def deltas(self, model: nn.Module, state: AdapterState) -> dict[str, Delta]:
        """The trained update per target module path (an update of that module's `.weight`), in the ORIGINAL
        base's coordinates, so reading, merging, serving or exporting it needs no method code. Values are detached
        and may share storage with the live parameters. A method whose adapter is not a pure update of the base
        (`base_changed`) returns what it can state as deltas and keeps the rest in `training_state`."""

    def training_state(self, model: nn.Module, state: AdapterState) -> dict[str, torch.Tensor]:
        """Tensors that resuming training needs and the deltas do not carry (factors behind a product, masks, a
        changed base). When `base_changed`, absolute weights that replace base tensors are named exactly as the
        plain base's state_dict names them (docs/FORMAT.md). Detached; may share storage. None by default."""
        return {}

    @abstractmethod
    def restore(self, model: nn.Module, state: AdapterState, deltas: Mapping[str, Delta],
                training_state: Mapping[str, torch.Tensor]) -> None:
        """After `attach` on a fresh base, put a saved update back so the model equals the one that was saved.
        The core has already checked that the names, kinds and shapes match what `deltas`/`training_state` of the
        freshly attached model give; a value that still does not fit raises AdapterLoadError."""

    def base_changed(self, state: AdapterState) -> bool:
        """True when the adapter is not a pure update of the original base (absolute weights replace base tensors,
        e.g. full fine-tuning or a warm-up that trains the base): LoRA export is refused and `read_deltas` needs the
        base. Not the same as `modifies_base` (LaMDA's residual init changes W in place but its adapter is still
        a pure update, B S - B0 S0)."""
        return False

    def merge(self, model: nn.Module) -> None:
        """Fold the update into the base weights in place (reversible with unmerge)."""

    def unmerge(self, model: nn.Module) -> None:
        """Undo merge."""

    def unload(self, model: nn.Module) -> None:
        """Replace method layers by plain modules holding the current (merged) weights."""


class LayerMethod(Method):
    """A method whose trained values live in layers of one class (`layer_class`, a `WrappedLinear`). Its deltas
    are the layers' own records, and restoring, merging and unloading are the same for all such methods."""

    layer_class: type[nn.Module]

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {name: m for name, m in model.named_modules() if isinstance(m, self.layer_class)}

    def deltas(self, model: nn.Module, state: AdapterState) -> dict[str, Delta]:
        """Each layer's own record (`WrappedLinear.as_delta()`): already in the base's coordinates for layers whose
        base weight is the original one (S²FT, SMT); methods that move the base override this."""
        return {name: layer.as_delta() for name, layer in self.layers(model).items()}

    @torch.no_grad()
    def restore(self, model: nn.Module, state: AdapterState, deltas: Mapping[str, Delta],
                training_state: Mapping[str, torch.Tensor]) -> None:
        """For layers whose trainable tensor is their delta's `values` (as_delta() shares its storage): the saved
        indices must be the attached layer's own, then the values are copied in."""
        for name, layer in self.layers(model).items():
            live, saved = layer.as_delta(), deltas[name]
            check_same_support(self.id, name, live, saved)
            live.values.copy_(saved.values)

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


def per_layer_summary(counts: Mapping[str, int], num_layers: int) -> str:
    """{module path: count} -> "q_proj [3, 0, 5, 1], v_proj [...]": one list per projection, one entry per decoder
    layer (0 where the layer has none), for `selection_summary`."""
    import re

    table: dict[str, list[int]] = {}
    for path, count in counts.items():
        layer = re.search(r"(?:^|\.)(\d+)\.", path)
        if layer is None:
            continue
        row = table.setdefault(path.rsplit(".", 1)[-1], [0] * num_layers)
        row[int(layer.group(1))] += int(count)
    return ", ".join(f"{leaf} {row}" for leaf, row in table.items())


def check_same_support(method_id: str, name: str, live: Delta, saved: Delta) -> None:
    """A saved delta must describe the attached layer: same kind, shape, block size and indices (the values are
    what is restored). A mismatch means the file and its selection come from different saves, or were edited."""
    from subtune.core.errors import AdapterLoadError

    mine, theirs = live.to_tensors(""), saved.to_tensors("")
    same = live.meta() == saved.meta() and mine.keys() == theirs.keys() and all(
        torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in mine if k != ".values")
    if not same:
        raise AdapterLoadError(f"{method_id}: the saved {saved.kind} delta of {name} does not fit the layer its "
                               f"selection builds (a {live.kind} delta with other indices or shape); the adapter is "
                               "corrupt or was edited: re-save it from the trained model")


# The registry lives in core/registry.py (no torch there, so the package root can wire up the built-in methods
# without importing torch); it is re-exported here, where callers have always found it.
from subtune.core.registry import (  # noqa: E402,F401
    _REGISTRY, available_methods, config_from_dict, get_method, register_method, registered_methods,
)
