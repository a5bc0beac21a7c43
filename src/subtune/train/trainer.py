"""Train a prepared model with the HF Trainer: the method's callbacks, adapter checkpoints, throughput logging."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import torch
from transformers import TrainerCallback, TrainingArguments

from subtune.core.api import save, state_of
from subtune.data.loaders import CausalCollator, ChoiceCollator, encode_choice_record, encode_record


class AdapterCheckpointCallback(TrainerCallback):
    """Writes the subtune adapter into every Trainer checkpoint (`checkpoint-N/adapter/`)."""

    def __init__(self, model):
        self.model = model

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            save(self.model, Path(args.output_dir) / f"checkpoint-{state.global_step}" / "adapter")


class ThroughputCallback(TrainerCallback):
    """Adds tokens/s and peak memory (CUDA max allocated, else process RSS) to the Trainer's logs."""

    def __init__(self):
        self.samples = 0
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.samples += args.per_device_train_batch_size * args.gradient_accumulation_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.start is None:
            return
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        logs["samples_per_s"] = round(self.samples / elapsed, 2)
        if torch.cuda.is_available():
            logs["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        else:
            logs["rss_mib"] = round(psutil.Process().memory_info().rss / 2**20, 1)


def build_trainer(model, tokenizer, train_records: list[dict], output_dir: str | Path, *, max_steps: int = -1,
                  epochs: float = 1.0, learning_rate: float = 2e-4, batch_size: int = 16, grad_accum: int = 1,
                  warmup: float = 0.03, bf16: bool = False, seed: int = 0, logging_steps: int = 10,
                  save_steps: int = 500, max_length: int = 256, train_on_inputs: bool = False,
                  gradient_checkpointing: bool = False, progress: bool = True, **extra_args):
    """An HF Trainer (or the method's subclass) over LLM-Adapters records, ready for `.train()`."""
    state = state_of(model)
    if getattr(state.config, "objective", "lm") == "choice":
        dataset = [encode_choice_record(tokenizer, r, max_length) for r in train_records]
        collator = ChoiceCollator(tokenizer.pad_token_id)
    else:
        dataset = [encode_record(tokenizer, r, max_length, train_on_inputs) for r in train_records]
        collator = CausalCollator(tokenizer.pad_token_id)
    if gradient_checkpointing:
        # Every base weight is frozen, so checkpointed blocks need an input that requires grad.
        model.enable_input_require_grads()
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, num_train_epochs=epochs, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum, warmup_steps=warmup,
        lr_scheduler_type="linear", weight_decay=0.0, bf16=bf16, seed=seed, logging_steps=logging_steps,
        save_steps=save_steps, save_total_limit=2, report_to="none", remove_unused_columns=False,
        disable_tqdm=not progress, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        **({"gradient_checkpointing": True} if gradient_checkpointing else {}), **extra_args,
    )
    trainer_cls = state.method.trainer_class()
    callbacks = [AdapterCheckpointCallback(model), ThroughputCallback(), *state.method.callbacks(model, state.config)]
    return trainer_cls(model=model, args=args, train_dataset=dataset,
                       data_collator=collator, callbacks=callbacks)
