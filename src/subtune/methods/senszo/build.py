"""SensZOQ's reusable mask as one library call: calibrate on a model, pick the sensitive weights, write the file.

The paper computes the sensitive positions once, on general text, and reuses them for every task; `build_mask` is
that step (`subtune senszo-mask` only builds its arguments and prints the summary). Train with the file through
`SensZOConfig(mask_path=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from subtune.core.config import ConfigError
from subtune.core.surgery import find_targets
from subtune.data.calibration import calibration_for
from subtune.methods.senszo.config import SensZOConfig
from subtune.methods.senszo.mask import compute_mask, save_mask


@dataclass(frozen=True)
class MaskSummary:
    """What a built mask holds: `selected` of the `total` weights of `matrices` target matrices, at `path`."""

    path: Path
    selected: int
    total: int
    matrices: int


def build_mask(model: nn.Module, config: SensZOConfig, path: str | Path, tokenizer=None,
               records: list[dict] | None = None, *, seq: int = 512) -> MaskSummary:
    """Compute `config`'s mask on `model` (a plain base) and write it to `path` with the target shapes, so that a
    model it does not fit is refused when it is loaded.

    The calibration text follows `config.calibration_source`: "corpus" (the embedded pretraining text, `seq`-token
    windows; needs `tokenizer`) or "train" (`records`, one per sample); `config.calibration_samples` samples. Masks
    from `mask_source="magnitude"` or `"random"` read no data. `model` is left as it was (the calibration pass
    restores it); nothing is written unless the whole mask was computed.
    """
    if not isinstance(config, SensZOConfig):
        raise ConfigError(f"build_mask needs a SensZOConfig, got {type(config).__name__}; pass "
                          "subtune.SensZOConfig(density=..., ...)")
    if config.mask_path:
        raise ConfigError(f"the config's mask_path is set ({config.mask_path}), so it would reuse that mask instead "
                          "of computing one; drop mask_path to build a new mask")
    config.validate()
    targets = find_targets(model, config.target_modules)
    calibration = calibration_for(config, tokenizer, records, batch_size=1, seq=seq)
    mask = compute_mask(model, targets, config, calibration)
    save_mask(mask, path, {name: tuple(m.weight.shape) for name, m in targets.items()})
    return MaskSummary(Path(path), sum(int(i.numel()) for i in mask.values()),
                       sum(m.weight.numel() for m in targets.values()), len(mask))
