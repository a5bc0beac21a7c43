"""ZOTrainer: the HF Trainer with its step replaced by a zeroth-order SPSA step (two forwards, no backward).

Everything else is the Trainer's: data loading, lr schedule, logging, checkpoints, resume. The per-step seeds are a
pure function of (config seed, global step, direction), and each step's (seeds, projected gradients) is recorded and
written to `zo_history.json` in every checkpoint, so a run can be replayed with `subtune.ops.zo.replay`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from functools import partial
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from subtune.core import distributed
from subtune.core.api import state_of
from subtune.core.config import ConfigError, MethodConfig
from subtune.core.method import get_method
from subtune.eval.choice import candidate_scores, grouped, has_choices, ranking_metrics
from subtune.ops.sparse import DenseAndSparseLinear
from subtune.ops.zo import spsa_step

logger = logging.getLogger(__name__)

HISTORY_FILE = "zo_history.json"


def step_seed(base_seed: int, step: int, direction: int) -> int:
    return (base_seed * 1_000_003 + step * 7_919 + direction) % (2**62)


def fp32_lm_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token loss on the labelled tokens, computed in fp32 (ZO needs L+ − L− to well below 1e-3)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    # shift the labels, not the logits: slicing logits would copy a (tokens × vocab) tensor
    labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                             ignore_index=-100)


def choice_loss(model, batch: dict) -> torch.Tensor:
    """MeZO's multiple-choice objective: cross-entropy over candidates scored by their mean answer log-likelihood
    (`subtune.eval.choice.candidate_scores`, the scorer of candidate-ranking accuracy)."""
    groups = grouped(candidate_scores(model, batch), batch["choice_counts"].tolist())
    gold = batch["gold"].to(groups[0].device)
    return torch.stack([torch.nn.functional.cross_entropy(g[None], gold[i:i + 1]) for i, g in enumerate(groups)]).mean()


OBJECTIVES = {"lm": fp32_lm_loss, "choice": choice_loss}  # Method.objective(config) -> the loss a ZO step uses


def resolve_objective(config: MethodConfig, records: list[dict]) -> MethodConfig:
    """`config` with an "auto" objective resolved by the training records: "choice" when every record has
    `choices` holding its answer (multiple choice: the loss and the metric are over the candidates), else "lm".
    Other configs come back unchanged. Call it before `prepare`, so the saved config holds the resolved value."""
    if get_method(config.method).objective(config) != "auto":
        return config
    choice = bool(records) and all(has_choices(r) for r in records)
    return dataclasses.replace(config, objective="choice" if choice else "lm")


def batch_objective(state, batch: dict) -> str:
    """The objective of a step: the method's, with an unresolved "auto" read off the batch (ChoiceCollator
    batches carry `choice_counts`)."""
    objective = state.method.objective(state.config)
    if objective == "auto":
        return "choice" if "choice_counts" in batch else "lm"
    return objective


def dev_split(config: MethodConfig, records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, dev): for a zeroth-order run on the choice objective, the last `config.dev_size` records are held
    out as the dev split its best-dev selection reads (never the test split); otherwise (records, [])."""
    method = get_method(config.method)
    if not method.zeroth_order or method.objective(config) != "choice" or not config.dev_size:
        return records, []
    if len(records) < 2 * config.dev_size:
        raise ConfigError(f"{config.method}: dev_size {config.dev_size} holds out too much of the {len(records)} "
                          f"training records (it needs at least {2 * config.dev_size}); lower dev_size, or 0 to "
                          "train on all of them without best-dev selection")
    return records[:-config.dev_size], records[-config.dev_size:]


def zo_step(model, state, batch: dict, lr: float, seeds: list[int], reduce=None) -> dict:
    """One SPSA step of a prepared zeroth-order model, from what its method declares: the tensors it perturbs
    (`zo_tensors`), its objective, whether probes restore exactly (`exact_restore`), and its config's eps. The
    trainer and the benchmark both step through here. Both forwards must see the same function, so dropout must be
    off (ZOTrainer puts the model in eval mode); they run under inference_mode. Returns spsa_step's record (loss,
    projected grads, seeds). `reduce`: spsa_step's, for data parallel steps (ZOTrainer under a launcher).
    """
    method, config = state.method, state.config
    loss = OBJECTIVES[batch_objective(state, batch)]

    def loss_fn():
        with torch.inference_mode():
            return loss(model, batch)

    return spsa_step(method.zo_tensors(model, state), loss_fn, seeds, config.eps, lr,
                     exact_restore=method.exact_restore, reduce=reduce)


class ZOTrainer(Trainer):
    """Data parallel under a launcher: every rank draws the same z (the seeds depend on the step only), and the
    two losses of each direction are averaged across ranks weighted by this rank's loss items (labelled tokens, or
    questions for the choice objective), so every rank applies the update of the union batch: O(1) communication
    per step, no gradient all-reduce."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.history: list[dict] = []

    def train(self, resume_from_checkpoint=None, **kwargs):
        if isinstance(resume_from_checkpoint, (str, Path)):
            path = Path(resume_from_checkpoint) / HISTORY_FILE
            if path.is_file():
                self.history = json.loads(path.read_text())
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.is_world_process_zero():
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / HISTORY_FILE).write_text(json.dumps(self.history))

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # a ZO step leaves no gradients: no grad_norm (always 0) in the logs

    def training_step(self, model, inputs, num_items_in_batch=None):
        model = self.model  # the plain model: a DDP wrapper holds no subtune state, and ZO needs no gradient sync
        state = state_of(model)
        config = state.config
        model.eval()  # no dropout: both forwards must see the same function
        inputs = self._prepare_inputs(inputs)
        seeds = [step_seed(config.seed, self.state.global_step, j) for j in range(config.directions)]
        lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else self.args.learning_rate
        out = zo_step(model, state, inputs, lr, seeds, reduce=self._loss_reduce(state, inputs))
        self.history.append({"step": self.state.global_step, "seeds": out["seeds"],
                             "projected_grads": out["projected_grads"], "lr": lr})
        return torch.tensor(out["loss"], device=self.args.device)

    @staticmethod
    def _loss_reduce(state, batch: dict):
        """The token-weighted mean across ranks of this rank's losses (None for one process)."""
        if not distributed.active():
            return None
        if batch_objective(state, batch) == "choice":
            items = len(batch["gold"])  # choice_loss is a mean over questions
        else:
            items = int(batch["labels"][:, 1:].ne(-100).sum())  # fp32_lm_loss: a mean over shifted labels
        return partial(distributed.all_reduce_weighted_mean, weight=items)


class DenseCacheCallback(TrainerCallback):
    """Keeps every dense-and-sparse layer's dense weight dequant(D) + S for the run (`DenseAndSparseLinear.
    cache_dense`): each ZO probe is then one matmul per layer. Logs the memory the cache holds; frees it at the end."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, DenseAndSparseLinear)]

    def on_train_begin(self, args, state, control, **kwargs):
        held = sum(layer.cache_dense(True) for layer in self.layers)
        logger.info("dense cache: %.1f MB for %d layers (set dense_cache false to train in 4-bit memory)",
                    held / 2**20, len(self.layers))

    def on_train_end(self, args, state, control, **kwargs):
        for layer in self.layers:
            layer.cache_dense(False)


class BestDevCallback(TrainerCallback):
    """Best-dev selection for zeroth-order runs: the choice loss and candidate-ranking accuracy on the dev records
    before the first step, every `every` steps and after the last; the values of the evaluation with the lowest dev
    loss (the earliest on ties, so possibly the untouched model) are restored when training ends, before the adapter
    is saved. Selecting by dev loss is the paper's (the HF Trainer's default metric, specs/senszoq.md Z6): on a few
    dozen dev questions accuracy moves in coarse steps and ties, the loss does not.

    Keeps a copy of the best values of the method's ZO tensors (SensZOQ: its sparse values; MeZO: every weight, on
    the tensors' device). `curve` holds one point per evaluation: step, train seconds without the evaluations,
    dev_choice_loss and dev_ranking_accuracy; `best` is the restored point.
    """

    def __init__(self, model, tokenizer, records: list[dict], every: int, batch_size: int = 8):
        self.model, self.tokenizer, self.records, self.every, self.batch_size = model, tokenizer, records, every, \
            batch_size
        self.curve: list[dict] = []
        self.best: dict | None = None
        self.best_values: list[torch.Tensor] = []
        self.start = 0.0
        self.eval_seconds = 0.0

    def _tensors(self) -> list[torch.Tensor]:
        state = state_of(self.model)
        return state.method.zo_tensors(self.model, state)

    def _evaluate(self, step: int) -> None:
        begin = time.perf_counter()
        accuracy, loss = ranking_metrics(self.model, self.tokenizer, self.records, self.batch_size)
        self.curve.append({"step": step, "seconds": round(begin - self.start - self.eval_seconds, 3),
                           "dev_choice_loss": loss, "dev_ranking_accuracy": accuracy})
        if self.best is None or loss < self.best["dev_choice_loss"]:
            self.best = self.curve[-1]
            self.best_values = [t.detach().clone() for t in self._tensors()]
        self.eval_seconds += time.perf_counter() - begin

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self._evaluate(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self._evaluate(state.global_step)
            point = self.curve[-1]
            state.log_history.append({"step": state.global_step, "dev_choice_loss": point["dev_choice_loss"],
                                      "dev_ranking_accuracy": point["dev_ranking_accuracy"]})

    @torch.no_grad()
    def on_train_end(self, args, state, control, **kwargs):
        if self.curve[-1]["step"] != state.global_step:
            self._evaluate(state.global_step)
        for t, best in zip(self._tensors(), self.best_values):
            t.copy_(best)
        logger.info("best dev choice loss %.4f (ranking accuracy %.4f) at step %d of %d (restored)",
                    self.best["dev_choice_loss"], self.best["dev_ranking_accuracy"], self.best["step"],
                    state.global_step)


def add_best_dev(trainer, tokenizer, config: MethodConfig, dev_records: list[dict]) -> BestDevCallback | None:
    """Attach best-dev selection on `dev_records` (from `dev_split`) to a built trainer; None when there are none.
    The callback is also kept as `trainer.best_dev` (its `curve` and `best`)."""
    if not dev_records:
        return None
    callback = BestDevCallback(trainer.model, tokenizer, dev_records, config.eval_every)
    trainer.add_callback(callback)
    trainer.best_dev = callback
    return callback
