"""What every method layer shares: it wraps a frozen base nn.Linear, states its trained update as a `Delta`, and
merges that update into the base weight reversibly, the same way for every kind.

Why one merge: the per-kind math (which entries a merge touches, what it must save to undo itself bit for bit) lives
once in `subtune.core.deltas`; a layer only says what its update is (`as_delta()`), and `merge()` / `unmerge()`
here are the same for S²FT, SMT and LaMDA layers.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod

import torch
from torch import nn

from subtune.core.deltas import Delta, DeltaError


def master_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of trainable values on a base of `base_dtype`: at least fp32 (bf16/fp16 updates round away),
    float64 on a float64 base. Every method layer and PEFT's LoRA factors (methods/lora) use this one rule."""
    return torch.promote_types(base_dtype, torch.float32)


class WrappedLinear(nn.Module, metaclass=ABCMeta):
    """Base for method layers. Subclasses set `self.base_layer`, define `as_delta()` (abstract) and make their
    forward return `self.base_layer(x)` alone while `self.merged` (the update is then inside the weight).

    The layer keeps only what `unmerge()` needs: the original weight entries `merge_into` returned (a slice, the
    touched blocks' entries, or the whole weight for a low-rank update). Layers that merge another way (the
    dense-and-sparse layer of SensZOQ) override `merge`, `unmerge`, `merged` and `unloaded`.
    """

    base_layer: nn.Module
    _merge_saved: torch.Tensor | None = None  # the original entries while merged (a plain attribute: never saved)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects `.weight` (dtype, device, shape)
        return self.base_layer.weight

    @abstractmethod
    def as_delta(self) -> Delta:
        """The trained update in the base weight's (out, in) coordinates, detached (no autograd).

        It may share storage with the live parameters: clone it if the layer keeps training and you keep the record.
        (Named `as_delta`, not `delta`, because the sliced and block layers' trainable parameter is `delta`.)
        """

    @property
    def merged(self) -> bool:
        return self._merge_saved is not None

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (rounded once to its dtype); the forward then skips the update."""
        if self.merged:
            return
        self._merge_saved = self.as_delta().merge_into(self.base_layer.weight)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit for bit, from the entries saved by `merge()`, in any dtype."""
        if not self.merged:
            return
        weight, saved = self.base_layer.weight, self._merge_saved
        if saved.dtype != weight.dtype:  # checked before anything is written: the layer stays merged
            raise DeltaError(
                f"cannot unmerge {type(self).__name__}: its base weight was cast from {saved.dtype} to {weight.dtype} "
                f"after the merge, so the saved original entries no longer fit; cast the model back to {saved.dtype} "
                "before unmerging (or reload the base model)")
        self.as_delta().unmerge_from(weight, saved)
        self._merge_saved = None

    def unloaded(self) -> nn.Module:
        """A plain module computing what this layer computes (merges first)."""
        self.merge()
        return self.base_layer
