"""LaMDA / LaMDA++: low-dimensional adaptation (Azizi et al., Findings of EMNLP 2024, arXiv 2406.12832)."""

from subtune.methods.lamda.config import LaMDAConfig, LaMDAPlusConfig
from subtune.methods.lamda.freeze import PMBFreezer
from subtune.methods.lamda.method import LaMDAMethod

__all__ = ["LaMDAConfig", "LaMDAPlusConfig", "LaMDAMethod", "PMBFreezer", "PMBFreezeCallback"]


def __getattr__(name: str):
    if name == "PMBFreezeCallback":  # imports transformers: loaded when first asked for
        from subtune.methods.lamda.callback import PMBFreezeCallback

        return PMBFreezeCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
