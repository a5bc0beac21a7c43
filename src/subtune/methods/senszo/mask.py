"""SensZOQ policy: which weights are sensitive. Fisher-style: Σ over calibration samples of (∂L/∂W)², per sample."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from subtune.core import io
from subtune.core.errors import AdapterLoadError
from subtune.core.surgery import freeze


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
    scores = {n: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device) for n, m in targets.items()}
    freeze(model)
    handles = []
    for name, m in targets.items():
        m.weight.requires_grad_(True)

        def fold(param, name=name):
            scores[name] += param.grad.float().pow(2)
            param.grad = None
        handles.append(m.weight.register_post_accumulate_grad_hook(fold))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seen = 0
    try:
        for sample in tqdm(per_sample(calibration, samples), total=samples, desc="sensitivity", disable=not progress,
                           leave=False):
            sample = {k: v.to(device) for k, v in sample.items()}
            if "labels" not in sample:
                sample["labels"] = sample["input_ids"]
            model(**sample).loss.backward()
            seen += 1
    finally:
        for h in handles:
            h.remove()
        freeze(model)
        model.train(was_training)
    if seen == 0:
        raise ValueError("senszo: the calibration data gave no sample")
    return scores


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
    if config.mask_path:
        return load_mask(config.mask_path, targets)
    if config.mask_source == "sensitivity":
        if calibration is None:
            raise ValueError("senszo: the sensitivity mask needs calibration batches (or set mask_path)")
        scores = sensitivity(model, targets, calibration, config.calibration_samples)
    elif config.mask_source == "magnitude":
        scores = {n: m.weight.detach().float().abs() for n, m in targets.items()}
    else:
        generator = torch.Generator().manual_seed(config.seed)
        scores = {n: torch.rand(m.weight.shape, generator=generator) for n, m in targets.items()}
    return top_indices(scores, config.density, config.scope)


def save_mask(mask: dict[str, torch.Tensor], path: str | Path, shapes: dict[str, tuple[int, int]]) -> None:
    io.atomic_save_tensors(Path(path), {n: idx.to(torch.int64) for n, idx in mask.items()},
                           metadata={"format": "subtune-senszo-mask",
                                     "shapes": ";".join(f"{n}={s[0]}x{s[1]}" for n, s in shapes.items())})


def load_mask(path: str | Path, targets: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    mask = io.read_tensors(Path(path))
    unknown = sorted(set(mask) - set(targets))
    if unknown:
        raise AdapterLoadError(f"mask {path} names modules this model lacks: {unknown[:3]}")
    for name, idx in mask.items():
        if idx.numel() and int(idx.max()) >= targets[name].weight.numel():
            raise AdapterLoadError(f"mask {path}: indices for {name} exceed its size; it was made for another model")
    return mask
