"""Train a prepared model with the HF Trainer: the method's callbacks, adapter-only checkpoints that resume
bit-exactly, a stop on divergence, throughput logging, and the checks that run before any work."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path

import psutil
import torch
from transformers import TrainerCallback, TrainingArguments

from subtune.core.api import state_of
from subtune.core.checkpoint import trained_names
from subtune.core.config import MAX_SEED, ConfigError
from subtune.core.errors import CheckpointError, DataError, TrainingDivergedError
from subtune.data.loaders import (CausalCollator, ChoiceCollator, encode_choice_record, encode_prompt,
                                  encode_record)
from subtune.train import runs
from subtune.train.options import LR_SCHEDULERS, METRIC_SCHEDULERS, REPORT_TO

CLI_FLAGS = {"max_steps": "--max-steps", "epochs": "--epochs", "learning_rate": "--lr", "batch_size": "--batch-size",
             "grad_accum": "--grad-accum", "save_steps": "--save-steps", "max_length": "--max-length",
             "logging_steps": "--logging-steps", "warmup": "--warmup-steps/--warmup-ratio",
             "weight_decay": "--weight-decay", "lr_scheduler": "--lr-scheduler", "report_to": "--report-to",
             "max_grad_norm": "--max-grad-norm", "eval_steps": "--eval-steps", "eval_records": "--eval-data",
             "early_stopping_patience": "--early-stopping-patience"}



DEFAULT_MAX_LENGTH = 256


def resolve_seed(config, seed: int | None):
    """(config, seed) for a run: `seed` seeds every RNG (default: config.seed) and becomes config.seed unless the
    config already sets a seed of its own (a non-default value, which wins for the method)."""
    if seed is None:
        return config, config.seed
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed {seed!r} cannot work; give a whole number in [0, {MAX_SEED}] (e.g. 0)")
    default = next(f.default for f in dataclasses.fields(config) if f.name == "seed")
    if config.seed == default and seed != config.seed:
        config = dataclasses.replace(config, seed=seed)
    return config, seed


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_training_args(names: dict[str, str] | None = None, **values) -> None:
    """Range-check the training numbers before any work; `names` maps each to how the user spelled it (CLI flags).
    Only the values passed are checked."""
    name = (names or {}).get
    checks = {
        "max_steps": (lambda v: _is_int(v) and (v >= 1 or v == -1), "a whole number of steps >= 1, or -1 to train "
                      "for {epochs}"),
        "epochs": (lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a finite number of epochs > 0"),
        "learning_rate": (lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a finite learning rate > 0 "
                          "(e.g. the method's default_lr)"),
        "batch_size": (lambda v: _is_int(v) and v >= 1, "a whole number >= 1"),
        "grad_accum": (lambda v: _is_int(v) and v >= 1, "a whole number of batches >= 1 (1: no accumulation)"),
        "save_steps": (lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a number of steps > 0"),
        "max_length": (lambda v: _is_int(v) and v >= 1, "a whole number of tokens >= 1"),
        "logging_steps": (lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a number of steps > 0"),
        "warmup": (lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0 (a fraction of "
                   "the steps below 1, else steps)"),
        "weight_decay": (lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0 (0: none)"),
        "max_grad_norm": (lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a finite norm >= 0 (0: no "
                          "clipping)"),
        "lr_scheduler": (lambda v: v in LR_SCHEDULERS, f"one of {list(LR_SCHEDULERS)}"),
        "report_to": (lambda v: v in REPORT_TO, f"one of {list(REPORT_TO)}"),
        "eval_steps": (lambda v: v is None or (_is_int(v) and v >= 1), "a whole number of steps >= 1"),
        "early_stopping_patience": (lambda v: v is None or (_is_int(v) and v >= 1), "a whole number of evaluations "
                                    ">= 1"),
    }
    for key, value in values.items():
        if key in checks and not checks[key][0](value):
            wanted = checks[key][1].format(epochs=name("epochs", "epochs"))
            raise ConfigError(f"{name(key, key)} {value!r} cannot work; give {wanted}")
    if values.get("report_to") in REPORT_TO:
        check_reporter_installed(values["report_to"], name("report_to", "report_to"))
    check_eval_plan(names, **{k: values[k] for k in ("eval_records", "eval_steps", "early_stopping_patience",
                                                     "lr_scheduler", "save_steps") if k in values})


def check_reporter_installed(report_to: str, flag: str = "report_to") -> None:
    """The Trainer's logger integration needs its package; refuse now rather than when training starts."""
    import importlib.util

    packages = REPORT_TO[report_to]
    if packages and not any(importlib.util.find_spec(p) is not None for p in packages):
        raise ConfigError(f"{flag} {report_to}: the {packages[0]} package is not installed; install it "
                          f"(pip install {packages[0]}) or use {flag} none")


def check_eval_plan(names: dict[str, str] | None = None, *, eval_records=None, eval_steps: int | None = None,
                    early_stopping_patience: int | None = None, lr_scheduler: str = "linear",
                    save_steps: float = 500) -> None:
    """What needs an eval set has one, and early stopping's best checkpoint lines up with the saves."""
    name = (names or {}).get
    data = name("eval_records", "eval_records")
    needs = [(name(k, k), v) for k, v in (("early_stopping_patience", early_stopping_patience),
                                          ("eval_steps", eval_steps)) if v is not None]
    if lr_scheduler in METRIC_SCHEDULERS:
        needs.append((f"{name('lr_scheduler', 'lr_scheduler')} {lr_scheduler}", None))
    if eval_records is None and needs:
        raise ConfigError(f"{needs[0][0]} needs an eval set (it works on eval_loss); give {data} (held-out records) "
                          f"or drop {needs[0][0].split()[0]}")
    if eval_records is not None and not eval_records:
        raise ConfigError(f"{data} holds no records; give at least one held-out {{instruction, input, output}} record")
    if early_stopping_patience is not None and eval_steps is not None and _is_number(save_steps) \
            and save_steps >= 1 and save_steps % eval_steps:
        raise ConfigError(f"early stopping restores the best checkpoint, so {name('save_steps', 'save_steps')} "
                          f"({save_steps:g}) must be a multiple of {name('eval_steps', 'eval_steps')} ({eval_steps}); "
                          f"e.g. {name('save_steps', 'save_steps')} {eval_steps}")


def check_answers_fit(tokenizer, records: list[dict], max_length: int, train_on_inputs: bool = False,
                      name: str = "max_length") -> None:
    """Warn with the count of records whose answer `max_length` cuts; refuse when it cuts every answer away
    entirely (the loss would be over no token and nothing would be learned)."""
    if not records:
        raise DataError("there are no training records; give at least one {instruction, input, output} record")
    cut = lost = longest = 0
    for record in records:
        prompt = len(encode_prompt(tokenizer, record))
        total = prompt + len(tokenizer(record["output"], add_special_tokens=False).input_ids) + 1  # + EOS
        longest = max(longest, total)
        cut += total > max_length
        lost += prompt >= max_length
    if lost == len(records) and not train_on_inputs:
        raise ConfigError(f"{name} {max_length} cuts away the whole answer of every one of the {len(records)} "
                          f"records (their prompts alone are longer): nothing would be learned; raise {name} to "
                          f"{longest} (the longest record)")
    if cut:
        warnings.warn(f"{name} {max_length} cuts the answer of {cut} of {len(records)} records ({lost} lose it "
                      f"entirely); raise {name} to {longest} to keep every answer whole", stacklevel=2)


class FiniteGuardCallback(TrainerCallback):
    """Stops training (TrainingDivergedError) as soon as a trained value is NaN/inf after an optimizer step: the
    step's save comes after this callback, so no NaN checkpoint or adapter is ever written."""

    def __init__(self, model):
        self.model = model
        self.tensors: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        everything = self.model.state_dict(keep_vars=True)
        self.tensors = {n: everything[n] for n in trained_names(self.model)}

    def on_step_end(self, args, state, control, **kwargs):
        # one fp32 sum per tensor (no copy of it) and one sync per device; a sum is non-finite iff some value is,
        # short of an overflow that only values near 1e38 reach (diverged all the same)
        by_device: dict[torch.device, list[str]] = {}
        for name, t in self.tensors.items():
            by_device.setdefault(t.device, []).append(name)
        for names in by_device.values():
            sums = torch.stack([self.tensors[n].detach().sum(dtype=torch.float32) for n in names]).cpu()
            if not torch.isfinite(sums).all():
                bad = next(n for n, s in zip(names, sums) if not torch.isfinite(s))
                raise diverged(args, state.global_step, f"the trained values of {bad} are not finite")


def diverged(args, step: int, what: str) -> TrainingDivergedError:
    """The error for a diverged run: which step, what went wrong, what was kept, and the fix."""
    kept = [p for _, p in runs.checkpoints(args.output_dir) if runs.incomplete_reason(p) is None]
    keep = f"the last good checkpoint, {kept[-1]}, is kept" if kept else "no checkpoint had been written yet"
    return TrainingDivergedError(f"training diverged at step {step}: {what}. Nothing of step {step} was saved and "
                                 f"{keep}. Lower the learning rate (--lr / learning_rate, now "
                                 f"{args.learning_rate:g}) and train again")


class SubtuneTrainerMixin:
    """What subtune adds to the method's Trainer class (plain or ZO): checkpoints marked complete once fully written,
    an optimizer that resumes even after parameters left it (LaMDA's frozen B), strict loading of the trained
    tensors, and a stop on a non-finite loss."""

    def train(self, resume_from_checkpoint=None, **kwargs):
        """`resume_from_checkpoint=True` means the newest *complete* checkpoint (HF would take the newest folder,
        even one killed mid-write); the path is what the rest of the stack (ZOTrainer's history) gets."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = str(runs.find_resume_checkpoint(self.args.output_dir)[0])
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss.detach()).all():
            raise diverged(self.args, self.state.global_step + 1, f"the loss is {float(loss.detach().float()):g}")
        return loss

    def _param_names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.model.named_parameters()}

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            names = self._param_names()
            groups = [[names.get(id(p)) for p in g["params"]] for g in self.optimizer.param_groups]
            if any(n is None for g in groups for n in g):  # not all named: the groups cannot be rebuilt by name
                groups = None
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            runs.mark_complete(folder, {"step": self.state.global_step, "optimizer_params": groups})

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Give the fresh optimizer the checkpoint's parameter groups first: parameters that left the optimizer
        during the run (LaMDA's B at full freeze) would otherwise make the saved state not fit."""
        marker = runs.read_marker(checkpoint) if checkpoint is not None else None
        if marker and marker.get("optimizer_params") is not None:
            by_name = dict(self.model.named_parameters())
            saved = marker["optimizer_params"]
            groups = self.optimizer.param_groups
            unknown = [n for g in saved for n in g if n not in by_name]
            if len(saved) != len(groups) or unknown:
                raise CheckpointError(f"the optimizer state in {checkpoint} does not fit this model ({len(saved)} "
                                      f"parameter groups there, {len(groups)} here; unknown {unknown[:3]}); resume "
                                      "with the run's method and config")
            for group, group_names in zip(groups, saved):
                group["params"] = [by_name[n] for n in group_names]
        super()._load_optimizer_and_scheduler(checkpoint)

    def _issue_warnings_after_load(self, load_result):
        """The checkpoint holds the trained tensors only: the frozen base is missing by design, anything else is
        an error (not the Trainer's warning)."""
        trained = set(trained_names(self.model))
        missing = [k for k in load_result.missing_keys if k in trained]
        if missing or load_result.unexpected_keys:
            raise CheckpointError(f"the checkpoint does not fit the prepared model: missing {missing[:3]}, "
                                  f"unexpected {list(load_result.unexpected_keys)[:3]}; resume with the run's "
                                  "method, config and model")


class AdapterCheckpointCallback(TrainerCallback):
    """Kept for code that adds it to its own Trainer: a prepared model's `save_pretrained` now writes the adapter
    into every checkpoint (`checkpoint-N/adapter/`), so this only fills in one that is missing."""

    def __init__(self, model):
        self.model = model

    def on_save(self, args, state, control, **kwargs):
        from subtune.core.api import save

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / runs.ADAPTER_DIR
        if state.is_world_process_zero and not folder.is_dir():
            save(self.model, folder)


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


_TRAINER_CLASSES: dict[type, type] = {}


def subtune_trainer_class(base: type) -> type:
    """`base` (the method's Trainer class) with SubtuneTrainerMixin in front; one class per base."""
    if base not in _TRAINER_CLASSES:
        _TRAINER_CLASSES[base] = type(f"Subtune{base.__name__}", (SubtuneTrainerMixin, base), {})
    return _TRAINER_CLASSES[base]


def build_trainer(model, tokenizer, train_records: list[dict], output_dir: str | Path, *, max_steps: int = -1,
                  epochs: float = 1.0, learning_rate: float = 2e-4, batch_size: int = 16, grad_accum: int = 1,
                  warmup: float = 0.03, lr_scheduler: str = "linear", weight_decay: float = 0.0,
                  max_grad_norm: float = 1.0, bf16: bool = False, seed: int = 0, logging_steps: int = 10,
                  save_steps: int = 500, max_length: int = DEFAULT_MAX_LENGTH, train_on_inputs: bool = False,
                  eval_records: list[dict] | None = None, eval_steps: int | None = None,
                  early_stopping_patience: int | None = None, report_to: str = "none",
                  gradient_checkpointing: bool = False, progress: bool = True, **extra_args):
    """An HF Trainer (the method's class, with SubtuneTrainerMixin) over LLM-Adapters records, ready for `.train()`.

    `warmup` is steps (>= 1) or a fraction of the run (< 1), as TrainingArguments' warmup_steps. `eval_records`
    gives an eval_loss every `eval_steps` (default: every `logging_steps`; with early stopping, every `save_steps`);
    `early_stopping_patience` stops after that many evaluations without a better eval_loss and restores the best
    checkpoint's trained tensors (the adapter saved afterwards is that checkpoint's)."""
    check_training_args(max_steps=max_steps, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                        grad_accum=grad_accum, save_steps=save_steps, max_length=max_length,
                        logging_steps=logging_steps, warmup=warmup, lr_scheduler=lr_scheduler,
                        weight_decay=weight_decay, max_grad_norm=max_grad_norm, report_to=report_to,
                        eval_records=eval_records, eval_steps=eval_steps,
                        early_stopping_patience=early_stopping_patience)
    state = state_of(model)
    choice = state.method.objective(state.config) == "choice"
    if choice and eval_records is not None:
        raise ConfigError(f"{state.method.id}: an eval set measures eval_loss with the LM objective, and this run "
                          "trains the choice objective; drop the eval set (or train with objective 'lm')")
    if choice:
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
        lr_scheduler_type=lr_scheduler, weight_decay=weight_decay, max_grad_norm=max_grad_norm, bf16=bf16,
        seed=seed, logging_steps=logging_steps, save_steps=save_steps, save_total_limit=2, report_to=report_to,
        remove_unused_columns=False, disable_tqdm=not progress, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        **({"gradient_checkpointing": True} if gradient_checkpointing else {}),
        **_eval_args(eval_records, eval_steps, early_stopping_patience, batch_size, logging_steps, save_steps),
        **extra_args,
    )
    eval_dataset = None if eval_records is None else [encode_record(tokenizer, r, max_length) for r in eval_records]
    trainer_cls = subtune_trainer_class(state.method.trainer_class())
    # the guard runs last in each step's callbacks: it checks the values the method's own callbacks leave
    callbacks = [ThroughputCallback(), *state.method.callbacks(model, state), FiniteGuardCallback(model)]
    if early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=early_stopping_patience))
    return trainer_cls(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                       data_collator=collator, callbacks=callbacks)


def _eval_args(eval_records, eval_steps, early_stopping_patience, batch_size, logging_steps, save_steps) -> dict:
    """TrainingArguments for evaluating on eval_loss during training (none without an eval set). Early stopping
    keeps the best checkpoint (by eval_loss) and restores it at the end: it needs saves at evaluation steps."""
    if eval_records is None:
        return {}
    stopping = early_stopping_patience is not None
    steps = eval_steps if eval_steps is not None else save_steps if stopping else logging_steps
    out = {"eval_strategy": "steps", "eval_steps": steps, "per_device_eval_batch_size": batch_size,
           "prediction_loss_only": True}  # eval_loss only: no logits kept for the whole eval set
    if stopping:
        out.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    return out
