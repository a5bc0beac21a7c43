"""S²FT: structured sparse fine-tuning (Yang et al., NeurIPS 2024, arXiv 2412.06289)."""

from subtune.methods.s2ft.config import S2FTConfig
from subtune.methods.s2ft.method import S2FTMethod

__all__ = ["S2FTConfig", "S2FTMethod"]
