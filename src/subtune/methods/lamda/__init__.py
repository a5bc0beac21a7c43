"""LaMDA / LaMDA++: low-dimensional adaptation (Azizi et al., Findings of EMNLP 2024, arXiv 2406.12832)."""

from subtune.methods.lamda.config import LaMDAConfig, LaMDAPlusConfig
from subtune.methods.lamda.freeze import PMBFreezeCallback, PMBFreezer
from subtune.methods.lamda.method import LaMDAMethod

__all__ = ["LaMDAConfig", "LaMDAPlusConfig", "LaMDAMethod", "PMBFreezer", "PMBFreezeCallback"]
