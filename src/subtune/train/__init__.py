"""Trainer integration. The names below load on first use, so `subtune.train.options` (the CLI's choices) can be
imported without torch."""

import importlib

__all__ = ["build_trainer", "AdapterCheckpointCallback", "FiniteGuardCallback", "SubtuneTrainerMixin",
           "ThroughputCallback"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("subtune.train.trainer"), name)
    raise AttributeError(f"module 'subtune.train' has no attribute {name!r}")
