"""The public verbs: prepare, save, load, merge, unmerge, unload, export_lora, read_deltas, merge_deltas,
trainable_summary.

They work on an ordinary HF causal LM and dispatch to the method named in the config; none of them knows a method.
Every verb checks its inputs before it changes anything (core/guards.py); prepare and load either finish or leave
the model exactly as it was (core/rollback.py); save and export write whole directories atomically (core/io.py).
What an adapter holds is the method's update record, its deltas (core/deltas), in the format of
core/adapter_format.py (docs/FORMAT.md): reading, merging and exporting one needs no method code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from subtune.core import adapter_format as fmt
from subtune.core import bases, distributed, guards, io
from subtune.core.adapter_format import (  # noqa: F401 (re-exported)
    SELECTION_PREFIX, STATE_PREFIX, AdapterContents, merge_deltas, read_deltas,
)
from subtune.core.config import ConfigError, MethodConfig
from subtune.core.deltas import lora_factors
from subtune.core.errors import AdapterLoadError, ExportError, SelectionError, SubtuneError
from subtune.core.fingerprint import check_fingerprint, fingerprint
from subtune.core.guards import ADAPTER_FILES, CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE  # noqa: F401 (re-exported)
from subtune.core.method import Method, Selection, get_method
from subtune.core.peft_format import write_lora_factors
from subtune.core.rollback import seeded, transaction
from subtune.core.surgery import decoder_layers, freeze

__version__ = fmt.installed_version()  # importlib.metadata: the core imports nothing above it (no cycle)
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


def _refuse_prepared(model: nn.Module) -> None:
    if getattr(model, STATE_ATTR, None) is not None:
        raise SubtuneError(
            f"this model already has {state_of(model).method.id!r} attached; start again from a fresh base model")


def prepare(model: nn.Module, config: MethodConfig, calibration: Iterable[dict] | None = None) -> nn.Module:
    """Attach `config`'s method to `model` in place and freeze everything else. Returns the same model.

    Selection and initialisation run with every RNG seeded from `config.seed` (the caller's RNG states are restored
    afterwards), so the same base and config give byte-identical adapters. If anything fails, the model is restored.
    Under a launcher (torchrun, `accelerate launch`) it first joins or starts the process group, so every rank
    selects the same weights whether it runs before or after the Trainer's arguments (core/distributed.py).
    """
    guards.check_config_object(config)
    guards.check_model(model, "prepare")
    _refuse_prepared(model)
    _refuse_sharded_base(model, "prepare")
    distributed.ensure_process_group()
    method = get_method(config.method)
    config.validate()
    decoder_layers(model)
    if method.calibration_batches(config) and calibration is None:
        raise SubtuneError(
            f"method {method.id!r} selects what to train from data: pass calibration=<iterable of batches> "
            "(dicts with input_ids, attention_mask, labels)")
    with transaction(model, "prepare", method.modifies_base(config)), seeded(config.seed):
        state = _attach_state(model, method, config, Selection())  # the fingerprint is taken before any change
        state.selection = method.select(model, config, calibration)
        freeze(model)
        method.attach(model, config, state.selection)
    return model


def _refuse_sharded_base(model: nn.Module, verb: str) -> None:
    if distributed.fsdp_modules(model):
        raise SubtuneError(f"{verb}: this model is already sharded with FSDP2 (fully_shard); {verb} the plain model "
                           "first, then call fully_shard on its decoder layers and the root")


def _attach_state(model, method, config, selection) -> AdapterState:
    state = AdapterState(
        method=method, config=config, selection=selection, fingerprint=fingerprint(model),
        base_parameters=sum(p.numel() for p in model.parameters()),
        base_name=bases.canonical_name(str(getattr(model.config, "_name_or_path", "") or "")),
    )
    setattr(model, STATE_ATTR, state)
    from subtune.core.checkpoint import install_save_hook  # HF save_pretrained/Trainer: adapter only
    install_save_hook(model)
    return state


def adapter_contents(model: nn.Module) -> AdapterContents:
    """What `save` writes: the method's deltas, the selection's tensors and the method's training state (all
    detached, sharing storage with the model where they can)."""
    state = state_of(model)
    return AdapterContents(state.method.deltas(model, state), dict(state.selection.tensors),
                           state.method.training_state(model, state))


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor `save` writes, under its name in adapter.safetensors (docs/FORMAT.md)."""
    return adapter_contents(model).tensors()


def save(model: nn.Module, directory: str | Path, *, overwrite: bool = False, allow_nonfinite: bool = False) -> Path:
    """Write `adapter_config.json` + `adapter.safetensors` in format 2 (docs/FORMAT.md): the deltas, the selection,
    the training state and the base fingerprint.

    The directory is replaced atomically: a reader (or a crash) sees the old adapter or the new one, never a mix.
    Refuses, before writing anything, an adapter holding NaN/inf (unless `allow_nonfinite`) and a directory holding
    an adapter of another method, format or base model (unless `overwrite`); a newer save of the same run is fine.
    Several processes: rank 0 writes; under FSDP2 call it on every rank, the shards are gathered
    (core/distributed.py).
    """
    state = state_of(model)
    directory = guards.as_directory(directory, "save")
    with distributed.gathered(model):
        distributed.on_main_process("save", lambda: _write_adapter(state, adapter_contents(model), directory,
                                                                   overwrite, allow_nonfinite),
                                    collective=bool(distributed.fsdp_modules(model)))
    return directory


def _write_adapter(state: AdapterState, contents: AdapterContents, directory: Path, overwrite: bool,
                   allow_nonfinite: bool) -> Path:
    if not allow_nonfinite:
        guards.check_finite(contents.tensors(), "save")
    if not overwrite:
        guards.check_save_target(directory, state.method.id, state.fingerprint)
    config = {
        "format_version": FORMAT_VERSION,
        "subtune_version": __version__,
        "method": state.method.id,
        "config": state.config.to_dict(),
        "selection": state.selection.info,
        "fingerprint": state.fingerprint,
        **bases.base_record(state.base_name),  # an absolute path (and a shipped base's id): found from anywhere
        "base_parameters": state.base_parameters,
        "base_changed": state.method.base_changed(state),
        "deltas": fmt.delta_summary(contents.deltas),
    }
    with io.atomic_directory(directory, replaces=ADAPTER_FILES) as tmp:
        config["adapter_sha256"] = fmt.write_adapter_file(tmp / WEIGHTS_FILE, contents)
        io.atomic_write_json(tmp / CONFIG_FILE, config)
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The checked adapter_config.json of a subtune adapter directory (types, required fields, versions)."""
    return fmt.read_config(guards.as_directory(directory, "load"), __version__)


def _method_and_config(cfg: dict[str, Any], directory: Path) -> tuple[Method, MethodConfig]:
    try:
        method = get_method(cfg["method"])
    except KeyError as e:  # the registry's UnknownMethodError is a KeyError too
        raise AdapterLoadError(f"{directory}: {e.args[0] if e.args else e}") from None
    try:
        config = method.config_class.from_dict(cfg["config"])
    except (ConfigError, TypeError, ValueError) as e:
        raise AdapterLoadError(f"{directory / CONFIG_FILE}: its 'config' is invalid ({e}); the file is corrupt or was "
                               "edited: re-save the adapter") from None
    return method, config


def load(model: nn.Module, directory: str | Path, *, allow_nonfinite: bool = False,
         option_names: dict[str, str] | None = None) -> nn.Module:
    """Attach a saved adapter to a fresh copy of the base it was trained on: the method attaches from the saved
    selection, then `restore` puts the saved deltas and training state back (docs/FORMAT.md).

    Checks everything it can before changing `model` (config fields, versions, fingerprint, checksum, finite
    values); a failure while attaching (a tensor of the wrong shape, an index out of range, deltas that do not fit
    what the selection builds) restores the model.
    """
    directory = guards.as_directory(directory, "load")
    cfg = read_adapter_config(directory)
    guards.check_model(model, "load")
    _refuse_sharded_base(model, "load")
    if getattr(model, STATE_ATTR, None) is not None:
        raise SubtuneError("this model already has a subtune method attached; load onto a fresh base model")
    method, config = _method_and_config(cfg, directory)
    check_fingerprint(cfg["fingerprint"], model, directory)
    saved = fmt.read_adapter_file(directory / WEIGHTS_FILE, cfg["adapter_sha256"], allow_nonfinite=allow_nonfinite,
                                  option_names=option_names)  # how the NaN hint spells its option
    selection = Selection(saved.selection, cfg.get("selection", {}))
    base_tensors = model.state_dict(keep_vars=True)
    try:
        with transaction(model, "load", method.modifies_base(config)), seeded(config.seed):
            state = _attach_state(model, method, config, selection)
            state.base_name = cfg.get("subtune_base") or cfg.get("base_model_name_or_path") or state.base_name
            freeze(model)
            method.attach(model, config, selection)
            _check_contents_fit(method, model, state, saved, cfg, directory)
            if cfg["base_changed"]:
                _swap_in_base_values(base_tensors, saved.training_state)
            method.restore(model, state, saved.deltas, saved.training_state)
    except SubtuneError as e:
        if not isinstance(e, SelectionError):
            raise
        raise AdapterLoadError(f"{directory}: its selection does not fit this model ({e}); the adapter is corrupt, "
                               "was edited or was made for another model: re-save it from the trained model") from e
    except Exception as e:  # a layer refusing a shape: the file does not describe this model
        raise AdapterLoadError(f"{directory / WEIGHTS_FILE} does not fit this model ({type(e).__name__}: {e}); the "
                               "adapter is corrupt or was edited: re-save it from the trained model") from e
    return model


def _check_contents_fit(method: Method, model: nn.Module, state: AdapterState, saved: AdapterContents,
                        cfg: dict[str, Any], directory: Path) -> None:
    """The saved deltas and training state have exactly the names, kinds and shapes the freshly attached model
    gives (a restore would otherwise broadcast or drop values silently)."""
    where = directory / WEIGHTS_FILE
    fix = "the adapter is corrupt or was edited: re-save it from the trained model"
    if cfg["base_changed"] != method.base_changed(state):
        raise AdapterLoadError(f"{directory / CONFIG_FILE}: base_changed is {cfg['base_changed']}, but this "
                               f"{method.id!r} config gives {method.base_changed(state)}; {fix}")
    expected = method.deltas(model, state)
    _check_names(set(expected), set(saved.deltas), where, "the delta of module ", fix)
    for name, want in expected.items():
        got = saved.deltas[name]
        if got.meta() != want.meta():
            raise AdapterLoadError(f"{where}: the delta of {name} is {got.meta()}, the attached model needs "
                                   f"{want.meta()}; {fix}")
        _check_shapes(want.to_tensors(fmt.DELTA_PREFIX + name), got.to_tensors(fmt.DELTA_PREFIX + name), where, fix)
    expected_state = method.training_state(model, state)
    _check_names(set(expected_state), set(saved.training_state), where, f"tensor {STATE_PREFIX}", fix)
    _check_shapes({STATE_PREFIX + k: v for k, v in expected_state.items()},
                  {STATE_PREFIX + k: v for k, v in saved.training_state.items()}, where, fix)


def _check_names(expected: set[str], got: set[str], where: Path, what: str, fix: str) -> None:
    missing, unexpected = expected - got, got - expected
    if missing:
        raise AdapterLoadError(f"{where} lacks {what}{sorted(missing)[0]} ({len(missing)} missing); {fix}")
    if unexpected:
        raise AdapterLoadError(f"{where} holds {what}{sorted(unexpected)[0]} that this selection has no place for; "
                               f"{fix}")


def _check_shapes(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], where: Path, fix: str) -> None:
    for name, want in expected.items():
        have = got[name]
        if have.shape != want.shape:
            raise AdapterLoadError(f"{where}: tensor {name} has shape {list(have.shape)}, the model needs "
                                   f"{list(want.shape)}; {fix}")
        if want.is_floating_point() and not have.is_floating_point():
            raise AdapterLoadError(f"{where}: tensor {name} is {have.dtype}, the model needs a floating-point tensor; "
                                   f"{fix}")


@torch.no_grad()
def _swap_in_base_values(base_tensors: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Saved values that replace base tensors (full fine-tuning, MeZO: the adapter is the model) become those
    tensors' data by reference instead of being copied into them, so a failure can put the original data back
    without a second copy of the model (the transaction holds the originals); the method's own load then copies
    each value onto itself. Only where that costs no memory (same device and dtype, the usual CPU load); elsewhere
    the method copies in place, and a failure after that is reported as unrecoverable instead of hidden. Absolute
    weights carry the plain base's state_dict names (docs/FORMAT.md), which `base_tensors` (taken before attach)
    has."""
    for name, value in values.items():
        t = base_tensors.get(name)
        if t is not None and (t.shape, t.dtype, t.device) == (value.shape, value.dtype, value.device):
            t.data = value


def merge(model: nn.Module, *, allow_nonfinite: bool = False) -> nn.Module:
    """Fold the trained update into the base weights in place; `unmerge` undoes it. Refuses NaN/inf updates, and
    an FSDP2-sharded model (under DDP every rank merges its own copy)."""
    state = state_of(model)
    distributed.refuse_sharded(model, "merge")
    if not state.merged:
        if not allow_nonfinite:
            guards.check_finite(adapter_contents(model).tensors(), "merge")
        state.method.merge(model)
        state.merged = True
    return model


def unmerge(model: nn.Module) -> nn.Module:
    state = state_of(model)
    distributed.refuse_sharded(model, "unmerge")
    if state.merged:
        state.method.unmerge(model)
        state.merged = False
    return model


def unload(model: nn.Module, *, allow_nonfinite: bool = False) -> nn.Module:
    """Merge, then replace method layers with plain modules: returns a plain HF model with no subtune state."""
    state = state_of(model)
    distributed.refuse_sharded(model, "unload")
    merge(model, allow_nonfinite=allow_nonfinite)
    state.method.unload(model)
    delattr(model, STATE_ATTR)
    from subtune.core.checkpoint import remove_save_hook  # a plain HF model saves as one again
    remove_save_hook(model)
    return model


def export_lora(model: nn.Module, directory: str | Path, max_rank: int = 512, fallback: str = "error", *,
                overwrite: bool = False, allow_nonfinite: bool = False,
                base_path: str | None = None, option_names: dict[str, str] | None = None) -> dict[str, Any]:
    """Write a PEFT LoRA adapter equal to the trained update, for any method, from its deltas.

    Its `base_model_name_or_path` is `base_path` if given (e.g. a copy of the base written beside it), else the
    base's absolute directory, so `peft.AutoPeftModelForCausalLM.from_pretrained(directory)` opens it offline.

    Each module's delta becomes exact LoRA factors where its rank allows (one-hot factors for columns/rows, block
    factors for blocks, the factors themselves for lowrank; `Delta.to_lora`). A module needing a rank above
    `max_rank` (vLLM's ceiling is 512) raises ExportError, or with fallback="svd" is exported as its best
    rank-`max_rank` approximation (the returned dict reports each relative error). An adapter that replaced base
    weights (`base_changed`) has no LoRA form against the original base and is refused. The directory is written
    atomically; an earlier LoRA export there is replaced, a subtune adapter only with `overwrite=True`. NaN/inf
    updates are refused unless `allow_nonfinite`. `option_names` spells the fixes in error messages as the caller's
    user knows them (the CLI: its flags; keys as `guards.API_NAMES`).
    """
    state = state_of(model)
    names = guards.hint_names(option_names)
    guards.check_export_args(max_rank, fallback, names)
    directory = guards.as_directory(directory, "export_lora")
    if state.method.base_changed(state):
        raise ExportError(
            f"this {state.method.id!r} adapter is not a pure update of the original base (it replaced base weights, "
            "e.g. full fine-tuning or a warm-up that trained the base), so no LoRA is exact against that base; "
            f"export a merged model instead ({names['merged']})")
    def write() -> dict[str, Any]:
        deltas = state.method.deltas(model, state)
        if not allow_nonfinite:
            guards.check_finite(AdapterContents(deltas, {}, {}).tensors(), "export", option_names=names)
        if not overwrite:
            guards.check_export_target(directory, option_names=names)
        factors, info = lora_factors(deltas, max_rank, fallback, names)
        write_lora_factors(directory, factors, base_name=base_path or bases.base_path_for_peft(state.base_name))
        return {**info, "directory": str(directory)}

    # several processes: rank 0 writes and returns the info (the others None); under FSDP2 every rank calls it,
    # gathers the shards and gets the info
    with distributed.gathered(model):
        return distributed.on_main_process("export_lora", write, collective=bool(distributed.fsdp_modules(model)))


@dataclass
class TrainableSummary:
    trainable: int  # values training can change (an SMT edge block's padding is not counted)
    base: int
    optimizer_state_bytes: int  # AdamW: two fp32 moments per stored trainable entry (none for zeroth-order methods)
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
    zeroth_order = bool(state and state.method.zeroth_order)  # SPSA keeps no optimizer state and no gradients
    return TrainableSummary(  # the count is of reachable values, the bytes of what is stored (padding included)
        trainable=state.method.trainable_values(model, state) if state else n, base=base,
        optimizer_state_bytes=0 if zeroth_order else 8 * n,
        gradient_bytes=0 if zeroth_order else sum(p.numel() * p.element_size() for p in trainable),
    )


def export_merged(model: nn.Module, directory: str | Path, tokenizer=None, *, overwrite: bool = False,
                  allow_nonfinite: bool = False, option_names: dict[str, str] | None = None) -> Path:
    """Write the trained model with its update merged into the base weights as a plain HF model directory
    (`save_pretrained`, safetensors; plus `tokenizer` when given), which transformers or vLLM load with no subtune
    code. Every method has this export; it is the only one for updates with no exact LoRA form against the
    original base (full fine-tuning, MeZO, a warmed SMT base, sparse updates above the rank cap).

    `model` is unloaded in place (`subtune.unload`): afterwards it is that plain merged model. Everything that can
    be checked is checked first: the directory must be writable and hold no subtune adapter (unless `overwrite`),
    and NaN/inf updates are refused (unless `allow_nonfinite`). The directory is written atomically. Several
    processes (DDP): each rank that calls it unloads its copy, rank 0 writes. Refused on an FSDP2-sharded model.
    """
    state_of(model)
    directory = guards.as_directory(directory, "export_merged")
    distributed.refuse_sharded(model, "export_merged")

    def check() -> None:
        if not overwrite:
            guards.check_export_target(directory, "a merged export", option_names)
        io.check_writable(directory)

    distributed.on_main_process("export_merged", check)
    unload(model, allow_nonfinite=allow_nonfinite)
    distributed.on_main_process("export_merged", lambda: _write_merged(model, directory, tokenizer))
    return directory


def _write_merged(model: nn.Module, directory: Path, tokenizer) -> Path:
    # dropped from an existing directory: an earlier export's shards this one would not overwrite, and adapter
    # files (an earlier LoRA export; a subtune adapter only gets here with overwrite) that loaders would pick up
    stale = {p.name for p in directory.glob("model*.safetensors*")} if directory.is_dir() else set()
    stale |= set(ADAPTER_FILES)
    with io.atomic_directory(directory, replaces=stale) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return directory
