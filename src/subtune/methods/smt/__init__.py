"""SMT: sparse matrix tuning (He et al., ICLR 2025, arXiv 2405.15525)."""

from subtune.methods.smt.config import SMTConfig
from subtune.methods.smt.method import SMTMethod

__all__ = ["SMTConfig", "SMTMethod"]
