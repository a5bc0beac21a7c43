"""SMT policy: warm-up gradients -> block scores -> top-k blocks (global or per matrix)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from subtune.core.calibration import accumulate_gradient_statistic
from subtune.core.config import ConfigError
from subtune.core.distributed import broadcast_from_rank0
from subtune.core.errors import DataError
from subtune.core.surgery import find_targets
from subtune.methods.smt.config import SMTConfig
from subtune.ops.block_sparse import num_blocks


def total_blocks(model: nn.Module, block: int) -> int:
    """Official budget base: Σ over every 2-D parameter of (rows/b)·(cols/b), summed as floats, truncated once."""
    return int(sum(p.shape[0] / block * p.shape[1] / block for p in model.parameters() if p.dim() == 2))


def budgets(model: nn.Module, config: SMTConfig) -> tuple[int, int]:
    """(attention-group blocks, MLP-group blocks)."""
    n_total = total_blocks(model, config.block_size)

    def one(count, ratio, name):
        if count is not None:
            return count
        k = int(ratio * n_total)
        if ratio > 0 and k == 0:
            warnings.warn(f"smt: {name} {ratio} of {n_total} blocks rounds to 0; training 1 block", stacklevel=4)
            k = 1
        return k
    return one(config.num_blocks, config.ratio, "ratio"), one(config.mlp_num_blocks, config.mlp_ratio, "mlp_ratio")


def candidate_groups(model: nn.Module, config: SMTConfig) -> list[tuple[dict[str, nn.Linear], int]]:
    attention = find_targets(model, config.target_modules)
    mlp = [m for m in config.mlp_modules if m not in config.target_modules]
    mlp_targets = find_targets(model, mlp) if mlp and config.mlp_budget_set() else {}
    check_block_size(config.block_size, {**attention, **mlp_targets})
    k_attn, k_mlp = budgets(model, config)
    groups = [(attention, k_attn, "num_blocks")]
    if k_mlp > 0 and mlp_targets:
        groups.append((mlp_targets, k_mlp, "mlp_num_blocks"))
    groups = [g for g in groups if g[1] > 0]
    check_budget_fits(config, groups)
    return [(mods, k) for mods, k, _ in groups]


def check_block_size(block: int, modules: dict[str, nn.Linear]) -> None:
    """Refuse a block larger than every candidate matrix: scoring pads each matrix to whole blocks, so block_size
    100000 would allocate tens of GB for what is at most one ragged block per matrix."""
    widest = max(max(m.weight.shape) for m in modules.values())
    if block > widest:
        raise ConfigError(f"smt: block_size={block} is larger than every targeted matrix (the widest side is "
                          f"{widest}); set block_size <= {widest}")


def check_budget_fits(config: SMTConfig, groups: list[tuple[dict[str, nn.Linear], int, str]]) -> None:
    """Refuse, before any gradient is computed, an empty budget and an explicit one above the blocks there are."""
    if not groups:
        raise ConfigError("smt: the budget rounds to zero blocks on this model; set num_blocks >= 1 or a larger ratio")
    b = config.block_size
    for mods, k, name in groups:
        available = sum(num_blocks(m.weight.shape[0], b) * num_blocks(m.weight.shape[1], b) for m in mods.values())
        if k <= available:
            continue
        if getattr(config, name) is not None:
            raise ConfigError(f"smt: {name}={k} exceeds the {available} blocks of {b}x{b} in the targeted matrices; "
                              f"set {name} <= {available}")
        warnings.warn(f"smt: the ratio gives {k} blocks but the targeted matrices hold only {available}; training "
                      "all of them", stacklevel=4)


def warmup_gradients(model: nn.Module, candidates: dict[str, nn.Linear], calibration, config: SMTConfig,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """Signed fp32 sum over warm-up steps of each candidate weight's gradient (taken before any warm-up update)."""
    step, step_params = None, ()
    if config.warmup_updates:  # the official mode: real full fine-tuning steps during warm-up
        step_params = list(model.parameters())
        optimizer = torch.optim.AdamW(step_params, lr=config.warmup_lr, betas=(0.9, 0.95), weight_decay=0.0)

        def step():
            torch.nn.utils.clip_grad_norm_(step_params, 1.0)
            optimizer.step()
    result = accumulate_gradient_statistic(model, {n: m.weight for n, m in candidates.items()}, calibration, "sum",
                                           limit=config.warmup_steps, desc="smt warm-up", progress=progress,
                                           step=step, step_params=step_params)
    if result.batches == 0:
        raise DataError("smt: the calibration iterable gave no batch; pass warm-up batches (dicts with input_ids, "
                        "attention_mask, labels)")
    if result.batches < config.warmup_steps:
        warnings.warn(f"smt: warm-up used {result.batches} batches, fewer than warmup_steps={config.warmup_steps}",
                      stacklevel=3)
    return result.statistics


def block_scores(grad_sum: torch.Tensor, block: int, score: str) -> torch.Tensor:
    """(R, C) score per block; ragged edge blocks are scored over their real entries only."""
    out_f, in_f = grad_sum.shape
    n_r, n_c = num_blocks(out_f, block), num_blocks(in_f, block)

    def grid(t):
        return F.pad(t, (0, n_c * block - in_f, 0, n_r * block - out_f)).view(n_r, block, n_c, block)

    count = grid(torch.ones_like(grad_sum)).sum((1, 3))
    g = grid(grad_sum)
    if score == "abs_of_mean":  # the official default ("mean_abs" in the code is |mean|)
        return (g.sum((1, 3)) / count).abs()
    if score == "mean_of_abs":
        return g.abs().sum((1, 3)) / count
    if score == "l1":
        return g.abs().sum((1, 3))
    if score == "l2":
        return g.pow(2).sum((1, 3)).sqrt()
    raise ConfigError(f"smt: unknown score {score!r}; use one of abs_of_mean, mean_of_abs, l1, l2")


def top_blocks(scores: dict[str, torch.Tensor], k: int, scope: str) -> dict[str, tuple[list[int], list[int]]]:
    """{matrix: (rows, cols)} of the k best blocks; ties go to the earlier matrix/block (stable sort)."""
    names = list(scores)
    chosen: dict[str, list[int]] = {n: [] for n in names}
    if scope == "global":
        flat = torch.cat([scores[n].flatten().cpu() for n in names])
        owner = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
        offset = torch.cat([torch.arange(scores[n].numel()) for n in names])
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        for i in order.tolist():
            chosen[names[owner[i]]].append(int(offset[i]))
    else:
        per, extra = divmod(k, len(names))
        for i, n in enumerate(names):
            take = min(per + (i < extra), scores[n].numel())
            chosen[n] = torch.sort(scores[n].flatten().cpu(), descending=True, stable=True).indices[:take].tolist()
    out = {}
    for n, flat_ids in chosen.items():
        if flat_ids:
            ids = torch.tensor(sorted(flat_ids))
            n_c = scores[n].shape[1]
            out[n] = ((ids // n_c).tolist(), (ids % n_c).tolist())
    return out


def select_blocks(model: nn.Module, config: SMTConfig, calibration) -> dict[str, tuple[list[int], list[int]]]:
    """One warm-up over every candidate; then each budget group (attention, MLP) takes its own top-k."""
    groups = candidate_groups(model, config)
    sums = warmup_gradients(model, {n: m for mods, _ in groups for n, m in mods.items()}, calibration, config)
    selected = {}
    for candidates, k in groups:
        scores = {name: block_scores(sums[name], config.block_size, config.score) for name in candidates}
        selected.update(top_blocks(scores, k, config.scope))
    return broadcast_from_rank0(selected)
