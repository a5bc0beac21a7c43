"""SensZOQ (Guo et al., ICLR 2025, arXiv 2406.02913) and the MeZO baseline (Malladi et al., arXiv 2305.17333)."""

from subtune.methods.senszo.build import MaskSummary, build_mask
from subtune.methods.senszo.config import MeZOConfig, SensZOConfig
from subtune.methods.senszo.mask import compute_mask, save_mask
from subtune.methods.senszo.method import MeZOMethod, SensZOMethod

__all__ = ["SensZOConfig", "MeZOConfig", "SensZOMethod", "MeZOMethod", "compute_mask", "save_mask", "build_mask",
           "MaskSummary"]
