"""Full fine-tuning baseline: every parameter trains; the saved "adapter" is the whole model."""

from subtune.methods.full.method import FullConfig, FullMethod

__all__ = ["FullConfig", "FullMethod"]
