from __future__ import annotations

from dataclasses import dataclass

from subtune.core.config import MethodConfig


@dataclass
class FullConfig(MethodConfig):
    """Train every weight (embeddings and norms included unless `train_embeddings` is off)."""

    method = "full"
    train_embeddings: bool = True
