"""ZOTrainer: the HF Trainer with its step replaced by a zeroth-order SPSA step (two forwards, no backward).

Everything else is the Trainer's: data loading, lr schedule, logging, checkpoints, resume. The per-step seeds are a
pure function of (config seed, global step, direction), and each step's (seeds, projected gradients) is recorded and
written to `zo_history.json` in every checkpoint, so a run can be replayed with `subtune.ops.zo.replay`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Trainer

from subtune.core.api import state_of
from subtune.ops.zo import spsa_step

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
    """MeZO's multiple-choice objective: cross-entropy over candidates scored by their mean answer log-likelihood."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits.float()
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    mask = (labels != -100).float()
    scores = (logp * mask).sum(-1) / mask.sum(-1).clamp_min(1)
    losses, start = [], 0
    for count, gold in zip(batch["choice_counts"].tolist(), batch["gold"].tolist()):
        group = scores[start:start + count]
        losses.append(torch.nn.functional.cross_entropy(group[None], torch.tensor([gold], device=group.device)))
        start += count
    return torch.stack(losses).mean()


OBJECTIVES = {"lm": fp32_lm_loss, "choice": choice_loss}  # Method.objective(config) -> the loss a ZO step uses


def zo_step(model, state, batch: dict, lr: float, seeds: list[int]) -> dict:
    """One SPSA step of a prepared zeroth-order model, from what its method declares: the tensors it perturbs
    (`zo_tensors`), its objective, whether probes restore exactly (`exact_restore`), and its config's eps. The
    trainer and the benchmark both step through here. Both forwards must see the same function, so dropout must be
    off (ZOTrainer puts the model in eval mode); they run under inference_mode. Returns spsa_step's record (loss,
    projected grads, seeds).
    """
    method, config = state.method, state.config
    loss = OBJECTIVES[method.objective(config)]

    def loss_fn():
        with torch.inference_mode():
            return loss(model, batch)

    return spsa_step(method.zo_tensors(model, state), loss_fn, seeds, config.eps, lr,
                     exact_restore=method.exact_restore)


class ZOTrainer(Trainer):
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

    def training_step(self, model, inputs, num_items_in_batch=None):
        state = state_of(model)
        config = state.config
        model.eval()  # no dropout: both forwards must see the same function
        inputs = self._prepare_inputs(inputs)
        seeds = [step_seed(config.seed, self.state.global_step, j) for j in range(config.directions)]
        lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else self.args.learning_rate
        out = zo_step(model, state, inputs, lr, seeds)
        self.history.append({"step": self.state.global_step, "seeds": out["seeds"],
                             "projected_grads": out["projected_grads"], "lr": lr})
        return torch.tensor(out["loss"], device=self.args.device)
