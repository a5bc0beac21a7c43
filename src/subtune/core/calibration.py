"""One calibration loop for every method that chooses what to train from data.

S²FT (gradient and activation scores), SMT (warm-up gradients) and SensZOQ (per-sample squared gradients) all run
the same pass: freeze the model, let gradients reach only the weights being scored, run calibration batches,
fold each gradient (or activation) into a running statistic, and put the model back. This module is that pass.

Under a process group (torchrun, accelerate) every rank passes the same calibration batches; each computes on its
round-robin share and the statistics are summed across ranks, so all ranks hold the same global statistic and
choose the same weights (a sequential pass with `step` runs whole on every rank and takes rank 0's result). Ranks
given different batches, or a rank that fails, make every rank raise. core/distributed.py says why.

The mode is eval, for every method. Calibration measures a property of the base model on fixed data (the gradient
at the base weights, the size of an activation), so it has to be a deterministic function of weights and data:
eval mode turns dropout off (the same seed and data give the same selection, whatever the dropout RNG) and skips
train-only branches (HF runs gradient checkpointing only in train mode; that changes memory, not numbers). LLaMA's
only dropout, `attention_dropout`, is 0 by default, so for such models eval computes what train mode would.

Afterwards the model is as it was, even when a batch raises: every parameter's `requires_grad`, every module's
train/eval flag, and every `.grad` (gradients a caller had are set aside during the pass, so they neither leak into
the statistic nor get lost; the pass itself leaves none). Only a `step` (SMT's real-update warm-up) changes weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Hashable, Iterable, Iterator, Mapping, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from subtune.core import distributed
from subtune.core.errors import SubtuneError

GradientStatistic = Callable[[Hashable, torch.Tensor], torch.Tensor]
ActivationStatistic = Callable[[Hashable, tuple, torch.Tensor], torch.Tensor]

STATISTICS: dict[str, GradientStatistic] = {
    "sum": lambda key, grad: grad.float(),  # signed gradient sum (SMT's warm-up)
    "sum_sq": lambda key, grad: grad.float().pow(2),  # sum of squares (Fisher, when each batch is one sample)
}


class CalibrationError(SubtuneError, ValueError):
    """A calibration pass that cannot score what it was asked to (a weight no gradient reaches)."""


class Calibration(NamedTuple):
    """The accumulated statistic per key (the keys, in the order, of the parameters or modules given; none when no
    batch ran) and how many batches ran."""

    statistics: dict[Hashable, torch.Tensor]
    batches: int


def accumulate_gradient_statistic(model: nn.Module, params: Mapping[Hashable, nn.Parameter],
                                  batches: Iterable[dict], statistic: str | GradientStatistic = "sum_sq", *,
                                  limit: int | None = None, desc: str = "calibration", progress: bool = True,
                                  step: Callable[[], None] | None = None,
                                  step_params: Iterable[nn.Parameter] = ()) -> Calibration:
    """Σ over the first `limit` batches of `statistic(key, ∂loss/∂param)` for each parameter in `params` (weights of
    `model`, keyed as the caller likes).

    Only `params` (and `step_params`) get gradients; each one is folded into its running total as soon as it
    exists and then dropped, so the pass never holds more than one gradient per weight. `statistic` is "sum"
    (signed), "sum_sq" (squared) or a callable returning what to add (e.g. a per-column reduction); totals start at
    zero and keep the callable's dtype and device. A batch without `labels` is scored on its own tokens (the causal
    LM loss, padding excluded). For per-sample statistics, pass one sample per batch.

    `step`, if given, runs after each backward with every gradient still in place (e.g. clip + optimizer.step()
    over `step_params`: SMT's official real-update warm-up); the statistic sees the gradient before the step.
    """
    fold_value = STATISTICS[statistic] if isinstance(statistic, str) else statistic
    totals: dict[Hashable, torch.Tensor] = {}
    targets = dict(params)
    with _calibration_state(model):
        for p in model.parameters():
            p.requires_grad_(False)
        for p in [*targets.values(), *step_params]:
            p.requires_grad_(True)
        handles = []
        for key, param in targets.items():
            def fold(p, key=key):
                value = fold_value(key, p.grad)
                if key not in totals:
                    totals[key] = torch.zeros_like(value)
                totals[key] += value
                if step is None:
                    p.grad = None  # gradient-only: drop it as soon as it is summed
            handles.append(param.register_post_accumulate_grad_hook(fold))
        share = distributed.BatchShare(whole=step is not None)  # a sequential (step) pass cannot be split
        seen, error = 0, None
        try:
            for batch in _batches(model, share.take(batches, limit), share.total(batches, limit), desc, progress):
                loss = model(**_with_labels(batch)).loss
                if not loss.requires_grad:
                    raise CalibrationError(f"calibration ({desc}): the loss depends on none of the {len(targets)} "
                                           "weights to score, so no gradient reaches them; target modules the "
                                           "model's loss depends on")
                loss.backward()
                if step is not None:
                    step()
                    model.zero_grad(set_to_none=True)
                seen += 1
        except Exception as e:  # other ranks must hear of it, or they wait in the next collective
            error = e
        finally:
            for h in handles:
                h.remove()
        seen = share.agree(totals, list(targets), seen, error, desc)
        if step is not None:
            distributed.broadcast_tensors_(p.data for p in step_params)  # rank 0's warmed weights on every rank
    missing = [key for key in targets if key not in totals]
    if seen and missing:
        raise CalibrationError(f"calibration ({desc}): no gradient reached {missing[0]!r} ({len(missing)} of "
                               f"{len(targets)} weights), so it cannot be scored; target modules the model's loss "
                               "depends on")
    return Calibration({key: totals[key] for key in targets if key in totals}, seen)


def accumulate_activation_statistic(model: nn.Module, modules: Mapping[Hashable, nn.Module],
                                    batches: Iterable[dict], statistic: ActivationStatistic, *,
                                    limit: int | None = None, desc: str = "calibration",
                                    progress: bool = True) -> Calibration:
    """Σ over the first `limit` batches of `statistic(key, inputs, output)` for each module in `modules`, from
    forward passes only (no gradients, labels ignored), in the same mode as the gradient pass."""
    totals: dict[Hashable, torch.Tensor] = {}

    def hook(key):
        def fold(module, inputs, output):
            value = statistic(key, inputs, output)
            if key not in totals:
                totals[key] = torch.zeros_like(value)
            totals[key] += value
        return fold

    handles = [m.register_forward_hook(hook(key)) for key, m in modules.items()]
    share = distributed.BatchShare(whole=False)
    seen, error = 0, None
    try:
        with _calibration_state(model), torch.no_grad():
            for batch in _batches(model, share.take(batches, limit), share.total(batches, limit), desc, progress):
                model(**{k: v for k, v in batch.items() if k != "labels"})
                seen += 1
    except Exception as e:  # other ranks must hear of it, or they wait in the next collective
        error = e
    finally:
        for h in handles:
            h.remove()
    seen = share.agree(totals, list(modules), seen, error, desc)
    return Calibration({key: totals[key] for key in modules if key in totals}, seen)


@contextmanager
def _calibration_state(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients of the caller's during the pass; every flag and `.grad` restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    grads = [(p, p.grad) for p in model.parameters()]
    for p, _ in grads:
        p.grad = None
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for p, grad in grads:
            p.grad = grad
        for m, training in modes:
            m.training = training


def _batches(model: nn.Module, batches: Iterable[dict], total: int | None, desc: str,
             progress: bool) -> Iterator[dict]:
    """The batches, their tensors moved to the model's device (a progress bar on the main process only)."""
    device = next(model.parameters()).device
    show = progress and distributed.is_main_process()
    for batch in tqdm(batches, total=total, desc=desc, disable=not show, leave=False):
        yield {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _with_labels(batch: dict) -> dict:
    if "labels" in batch:
        return batch
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    return {**batch, "labels": labels}
