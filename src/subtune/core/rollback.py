"""Undo a failed prepare/load: put a model back exactly as it was before a method touched it.

What select/attach change is module structure (layers swapped for method layers, attributes such as PEFT's
`peft_config` or subtune's state), parameter flags (`requires_grad`, `.grad`, `.data` replaced by an fp32 copy) and,
for a few methods, base weights in place. The first two are recorded cheaply (a shallow copy of every module's
`__dict__`, a reference to every tensor); weights are copied only when the method says it changes them
(`Method.modifies_base`), since a copy doubles the model's memory while prepare runs. A change in place that nobody
declared is still detected by the tensor's version counter and reported instead of being left silently.
"""

from __future__ import annotations

import contextlib
import copy
import random
from typing import Iterator

import torch
from torch import nn

from subtune.core.errors import SubtuneError


def _copy_dict(d: dict) -> dict:
    """A copy of a module's __dict__ whose registries (_modules, _parameters, hooks...) are copies too."""
    return {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in d.items()}


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


class ModelSnapshot:
    """Everything prepare/load may change on `model`; `restore()` puts it back."""

    def __init__(self, model: nn.Module, copy_weights: bool = False):
        self.modules = [(m, _copy_dict(m.__dict__)) for m in model.modules()]
        named = dict(model.named_parameters(remove_duplicate=True))
        named.update(dict(model.named_buffers(remove_duplicate=True)))
        self.tensors = [(name, t, t.data, t.requires_grad, t.grad if isinstance(t, nn.Parameter) else None,
                         _version(t)) for name, t in named.items()]
        self.copies = {name: t.detach().clone() for name, t in named.items()} if copy_weights else {}

    @torch.no_grad()
    def restore(self) -> list[str]:
        """Put everything back; returns the names of tensors changed in place that could not be restored."""
        for module, saved in self.modules:
            module.__dict__.clear()
            module.__dict__.update(saved)
        lost = []
        for name, t, data, requires_grad, grad, version in self.tensors:
            if t.data.data_ptr() != data.data_ptr() or t.dtype != data.dtype or t.shape != data.shape:
                t.data = data  # `.data` was replaced (an fp32 copy, loaded values): the original is referenced here
            elif name in self.copies:
                if _version(t) != version:
                    t.copy_(self.copies[name])
            elif version is not None and _version(t) != version:
                lost.append(name)
            if isinstance(t, nn.Parameter):
                t.requires_grad_(requires_grad)
                t.grad = grad
        return lost


@contextlib.contextmanager
def transaction(model: nn.Module, verb: str, copy_weights: bool = False) -> Iterator[None]:
    """Run a block that changes `model`; if it raises, restore the model and re-raise."""
    snapshot = ModelSnapshot(model, copy_weights)
    try:
        yield
    except BaseException as e:
        lost = snapshot.restore()
        if lost:
            raise SubtuneError(
                f"{verb} failed ({type(e).__name__}: {e}) after changing base weights in place ({lost[:3]}); they "
                "cannot be restored: load the base model again") from e
        raise


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch (CPU and CUDA), Python's `random` and NumPy with `seed` for a block, then restore the caller's RNG
    states: what prepare selects and initialises depends on the config's seed only, and the caller's stream of
    random numbers (data order, dropout) is the same whether or not prepare ran."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    py_state = random.getstate()
    np = _numpy()
    np_state = np.random.get_state() if np else None
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        random.seed(seed)
        if np:
            np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            if np:
                np.random.set_state(np_state)


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy
