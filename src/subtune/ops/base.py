"""What every method layer shares: it wraps a frozen base nn.Linear and can merge its update into it."""

from __future__ import annotations

import torch
from torch import nn


class WrappedLinear(nn.Module):
    """Base for method layers. Subclasses set `self.base_layer` and define `merge()` (fold the update into the
    weights, reversibly) and `unmerge()`."""

    base_layer: nn.Module

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects `.weight` (dtype, device, shape)
        return self.base_layer.weight

    def unloaded(self) -> nn.Module:
        """A plain module computing what this layer computes (merges first)."""
        self.merge()
        return self.base_layer
