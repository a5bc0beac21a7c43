"""SensZOQ policy: which weights are sensitive. Fisher-style: Σ over calibration samples of (∂L/∂W)², per sample."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from subtune.core import io
from subtune.core.calibration import accumulate_gradient_statistic
from subtune.core.errors import DataError, SubtuneError

MASK_FORMAT = "subtune-senszo-mask"
FIX = "recompute it for this model with `subtune senszo-mask --model <this model> --out <file>` or subtune.save_mask"


class MaskError(SubtuneError, ValueError):
    """A SensZOQ mask (a file or index tensors) that does not fit the model: names, shapes, indices or emptiness."""


def per_sample(calibration, limit: int):
    """Split batches into single samples (squared gradients must be per sample, not of the batch sum)."""
    count = 0
    for batch in calibration:
        n = batch["input_ids"].shape[0]
        for i in range(n):
            if count >= limit:
                return
            sample = {k: v[i:i + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            if "attention_mask" in sample:
                keep = int(sample["attention_mask"].sum())  # right padding: drop the pad tail
                sample = {k: v[:, :keep] for k, v in sample.items()}
            yield sample
            count += 1


def sensitivity(model: nn.Module, targets: dict[str, nn.Linear], calibration, samples: int,
                progress: bool = True) -> dict[str, torch.Tensor]:
    """Σ over the first `samples` calibration samples of (∂L/∂W)² per target weight (the diagonal Fisher)."""
    result = accumulate_gradient_statistic(model, {n: m.weight for n, m in targets.items()},
                                           per_sample(calibration, samples), "sum_sq", limit=samples,
                                           desc="sensitivity", progress=progress)
    if result.batches == 0:
        raise DataError("senszo: the calibration data gave no sample; pass batches with at least one row of "
                        "input_ids (or use mask_source='magnitude' or a mask_path)")
    return result.statistics


def top_indices(scores: dict[str, torch.Tensor], density: float, scope: str) -> dict[str, torch.Tensor]:
    """Sorted flat indices of the top entries: exactly ceil(density·numel) per matrix, or the global top."""
    if scope == "per_matrix":
        return {n: torch.topk(s.flatten(), math.ceil(density * s.numel())).indices.sort().values.cpu()
                for n, s in scores.items()}
    flat = torch.cat([s.flatten().cpu() for s in scores.values()])
    k = math.ceil(density * flat.numel())
    chosen = torch.topk(flat, k).indices.sort().values
    out, offset = {}, 0
    for n, s in scores.items():
        mine = chosen[(chosen >= offset) & (chosen < offset + s.numel())] - offset
        if mine.numel():
            out[n] = mine
        offset += s.numel()
    return out


def compute_mask(model: nn.Module, targets: dict[str, nn.Linear], config, calibration) -> dict[str, torch.Tensor]:
    config.validate()  # density in (0, 1] etc.: a config changed after it was built must not write an empty mask
    if config.mask_path:
        return load_mask(config.mask_path, targets)
    if config.mask_source == "sensitivity":
        if calibration is None:
            raise DataError("senszo: the sensitivity mask needs calibration batches; pass calibration=..., or set "
                            "mask_path or mask_source='magnitude'")
        scores = sensitivity(model, targets, calibration, config.calibration_samples)
    elif config.mask_source == "magnitude":
        scores = {n: m.weight.detach().float().abs() for n, m in targets.items()}
    else:
        generator = torch.Generator().manual_seed(config.seed)
        scores = {n: torch.rand(m.weight.shape, generator=generator) for n, m in targets.items()}
    return top_indices(scores, config.density, config.scope)


def index_problem(index: torch.Tensor, numel: int) -> str | None:
    """Why `index` cannot be a set of flat positions into a weight of `numel` entries (None if it can)."""
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        return f"holds {str(index.dtype).removeprefix('torch.')} values, not integer positions"
    if index.dim() != 1:
        return f"has shape {list(index.shape)}, not a 1-D list of positions"
    if index.numel() == 0:
        return "holds no positions"
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= numel:
        return f"has position {low if low < 0 else high} outside [0, {numel})"
    if torch.unique(index).numel() != index.numel():
        return "repeats a position (it would be trained twice)"
    return None


def save_mask(mask: dict[str, torch.Tensor], path: str | Path, shapes: dict[str, tuple[int, int]]) -> None:
    """Write `mask` (flat positions per module) with the (out, in) shape of every target it was made for, so a
    model it does not fit is refused on load. Refuses an empty or malformed mask before writing anything."""
    mask = {name: torch.as_tensor(idx) for name, idx in mask.items()}
    if not any(idx.numel() for idx in mask.values()):
        raise MaskError(f"mask for {path} is empty; choose a density in (0, 1] that selects at least one weight")
    for name, idx in mask.items():
        if name not in shapes:
            raise MaskError(f"mask entry {name} has no shape in `shapes`; pass the shape of every target module")
        problem = index_problem(idx, shapes[name][0] * shapes[name][1])
        if problem:
            raise MaskError(f"mask entry {name} {problem}; pass sorted distinct flat positions into its weight")
    io.atomic_save_tensors(Path(path), {n: idx.to(torch.int64) for n, idx in mask.items()},
                           metadata={"format": MASK_FORMAT,
                                     "shapes": ";".join(f"{n}={s[0]}x{s[1]}" for n, s in shapes.items())})


def _read_mask_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """The index tensors and stored target shapes of a mask file, or a MaskError saying what is wrong with it."""
    from safetensors import safe_open

    if not path.is_file():
        raise MaskError(f"mask_path {path} does not exist; write it with `subtune senszo-mask --out {path}` or unset "
                        "mask_path")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged header or body
        raise MaskError(f"mask_path {path} is not a readable safetensors file ({e}); {FIX}") from None
    if metadata.get("format") != MASK_FORMAT or "shapes" not in metadata:
        raise MaskError(f"mask_path {path} is not a SensZOQ mask (no '{MASK_FORMAT}' metadata with target shapes); "
                        f"{FIX}")
    shapes = {}
    try:
        for item in filter(None, metadata["shapes"].split(";")):
            name, dims = item.rsplit("=", 1)
            out_f, in_f = (int(d) for d in dims.split("x"))
            shapes[name] = (out_f, in_f)
    except ValueError:
        raise MaskError(f"mask_path {path} has unreadable target shapes {metadata['shapes'][:60]!r}; {FIX}") from None
    return tensors, shapes


def load_mask(path: str | Path, targets: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """A saved mask, checked against this model's targets: the same modules with the same shapes, and valid
    positions. Any mismatch is refused, naming the first one (a mask made for another model would otherwise train
    the wrong, or far fewer, weights)."""
    path = Path(path)
    tensors, shapes = _read_mask_file(path)
    here = {n: tuple(m.weight.shape) for n, m in targets.items()}
    if _short_names(shapes) != _short_names(here):
        raise MaskError(f"mask_path {path} was made for target_modules [{_short_names(shapes)}], this config targets "
                        f"[{_short_names(here)}]; set target_modules to the mask's, or {FIX}")
    missing = [n for n in here if n not in shapes]
    extra = [n for n in shapes if n not in here]
    if missing or extra:
        what = f"has no entry for {missing[0]}" if missing else f"names {extra[0]}, which this model lacks"
        raise MaskError(f"mask_path {path} was made for another model: it {what} ({len(shapes)} modules in the mask, "
                        f"{len(here)} targets here); {FIX}")
    for name, shape in here.items():
        if shapes[name] != shape:
            raise MaskError(f"mask_path {path} was made for another model: {name} is {shapes[name][0]}x"
                            f"{shapes[name][1]} in the mask but {shape[0]}x{shape[1]} here; {FIX}")
    unknown = sorted(set(tensors) - set(shapes))
    if unknown:
        raise MaskError(f"mask_path {path} holds positions for {unknown[0]}, which its target shapes do not list; "
                        f"the file is damaged: {FIX}")
    for name, idx in tensors.items():
        problem = index_problem(idx, shapes[name][0] * shapes[name][1])
        if problem:
            raise MaskError(f"mask_path {path}: the entry for {name} {problem}; the file is damaged: {FIX}")
    if not tensors:
        raise MaskError(f"mask_path {path} is empty (no positions); {FIX} with a density in (0, 1]")
    return {name: idx.to(torch.int64).sort().values for name, idx in tensors.items()}


def _short_names(shapes: dict[str, tuple[int, int]]) -> str:
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in shapes}))
