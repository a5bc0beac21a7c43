"""LaMDA's PMB freezing as an HF TrainerCallback (apart from freeze.py: transformers loads only when a LaMDA run
builds its Trainer, not when the method is registered)."""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback

from subtune.methods.lamda.freeze import PMBFreezer


class PMBFreezeCallback(TrainerCallback):
    """Runs PMBFreezer after each optimizer step of an (unmodified) HF Trainer."""

    def __init__(self, model: nn.Module, config):
        self.model, self.config, self.freezer = model, config, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.freezer = PMBFreezer(self.model, state.max_steps, self.config.freeze_fraction, self.config.freeze_steps,
                                  self.config.freeze_order)
        # resuming: replay the schedule up to the restored step (columns freeze at their current values)
        if state.global_step:
            self.freezer.after_step(kwargs.get("optimizer"), state.global_step)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.freezer.after_step(optimizer, state.global_step)
