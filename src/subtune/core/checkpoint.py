"""HF-native saving of a prepared model: `model.save_pretrained(dir)` writes the subtune adapter and the trained
tensors, never a copy of the frozen base.

The HF Trainer writes the model part of a checkpoint (and `trainer.save_model()`) through `model.save_pretrained`,
and resumes (and `load_best_model_at_end`) with a non-strict `model.load_state_dict` of `model.safetensors`. So
`prepare`/`load` install this `save_pretrained` on the prepared model itself (removed again by `unload`), and even
an unmodified `transformers.Trainer` saves and resumes adapter-only checkpoints:

    dir/adapter/           the subtune adapter (`subtune.load(base, dir / "adapter")`)
    dir/model.safetensors  the trained tensors under their state_dict names (what the Trainer's resume restores);
                           for full fine-tuning and MeZO, where the adapter *is* the model, a hard link to the
                           adapter's file, so the model is on disk once (its tensors are named
                           `state.<state_dict name>` there; the prepared model's `load_state_dict` reads them
                           under their own names)

No config.json is written, so `from_pretrained(dir)` fails loudly instead of building a half-random model; to get a
plain HF model, `subtune.unload(model)` first, then `save_pretrained`.
"""

from __future__ import annotations

import os
import tempfile
import types
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

ADAPTER_DIR = "adapter"
TRAINED_FILE = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME: the file the Trainer's resume reads
HOOK = "save_pretrained"
LOAD_HOOK = "_subtune_load_hook"  # the handle of the load_state_dict pre-hook below
STATE_PREFIX = "state."  # the adapter file's namespace of training state (docs/FORMAT.md)


def install_save_hook(model: nn.Module) -> None:
    """Give `model` the adapter-only `save_pretrained` (a bound method, so `copy.deepcopy` rebinds it), and a
    `load_state_dict` that reads a hard-linked adapter file (see `_adapter_names`)."""
    model.__dict__[HOOK] = types.MethodType(save_pretrained, model)
    if LOAD_HOOK not in model.__dict__:
        model.__dict__[LOAD_HOOK] = model._register_load_state_dict_pre_hook(_adapter_names)


def remove_save_hook(model: nn.Module) -> None:
    """Back to the class's own `save_pretrained` (after `unload` the model is a plain HF model again)."""
    model.__dict__.pop(HOOK, None)
    handle = model.__dict__.pop(LOAD_HOOK, None)
    if handle is not None:
        handle.remove()


def _adapter_names(state_dict, prefix, *args) -> None:
    """A model.safetensors hard-linked to the adapter's file names the trained tensors `state.<state_dict name>`
    (the adapter format's namespace); the Trainer's resume loads it with `model.load_state_dict`, so the names are
    put back before the model's own keys are matched."""
    if prefix:
        return
    for key in [k for k in state_dict if k.startswith(STATE_PREFIX)]:
        state_dict[key[len(STATE_PREFIX):]] = state_dict.pop(key)


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.dtype)


def trained_names(model: nn.Module) -> list[str]:
    """state_dict names of everything training changes: parameters that require grad, and the tensors the method
    keeps as training state (e.g. LaMDA's B after it froze), once per storage (tied weights are written once)."""
    from subtune.core.api import state_of

    state = state_of(model)
    saved = {_key(t) for t in state.method.training_state(model, state).values() if t.numel()}
    names, seen = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor) or not t.numel():
            continue
        trained = (isinstance(t, nn.Parameter) and t.requires_grad) or _key(t) in saved
        if trained and _key(t) not in seen:
            seen.add(_key(t))
            names.append(name)
    return names


def trained_state(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The trained tensors by state_dict name (from `state_dict` when the caller gathered one, e.g. the Trainer)."""
    source = state_dict if state_dict is not None else model.state_dict()
    return {n: source[n].detach() for n in trained_names(model) if n in source}


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={"format": "pt", "subtune": "trained tensors only; the frozen base is not here"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _link_if_same(adapter_file: Path, target: Path, tensors: dict[str, torch.Tensor], model: nn.Module) -> bool:
    """Hard-link the adapter's file as the trained-tensor file when it already is one (full FT, MeZO): it holds only
    training state, every trained name is in it and every name in it is a state_dict name of this model."""
    if not adapter_file.is_file():
        return False
    with safe_open(str(adapter_file), framework="pt") as f:
        keys = set(f.keys())
    names = {k[len(STATE_PREFIX):] for k in keys if k.startswith(STATE_PREFIX)}
    if len(names) != len(keys) or not (set(tensors) <= names <= set(model.state_dict())):
        return False
    tmp = target.with_name(f".{target.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(adapter_file, tmp)
    except OSError:  # a file system without hard links: write the copy instead
        return False
    os.replace(tmp, target)
    return True


def save_pretrained(self: nn.Module, save_directory, is_main_process: bool = True, state_dict: dict | None = None,
                    push_to_hub: bool = False, **kwargs) -> None:
    """Adapter-only `save_pretrained` of a prepared model (see the module docstring). HF's other keywords
    (`safe_serialization`, `max_shard_size`, ...) do not apply to a few small tensors and are ignored."""
    from subtune.core import api
    from subtune.core.errors import SubtuneError

    if getattr(self, api.STATE_ATTR, None) is None:  # prepare failed or state was removed: a plain model again
        remove_save_hook(self)
        return type(self).save_pretrained(self, save_directory, is_main_process=is_main_process,
                                          state_dict=state_dict, push_to_hub=push_to_hub, **kwargs)
    if push_to_hub:
        raise SubtuneError("save_pretrained(push_to_hub=True) on a prepared model is not supported; save it, then "
                           "upload the adapter directory yourself")
    if not is_main_process:
        return None
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    api.save(self, directory / ADAPTER_DIR)
    tensors = trained_state(self, state_dict)
    target = directory / TRAINED_FILE
    if not _link_if_same(directory / ADAPTER_DIR / api.WEIGHTS_FILE, target, tensors, self):
        _atomic_save(target, tensors)
    return None
