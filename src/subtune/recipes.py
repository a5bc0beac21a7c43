"""End-to-end recipes the CLI calls: build a config, fine-tune, evaluate, the demo table.

Kept out of cli.py so they can be used (and tested) from Python.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from subtune.core import api
from subtune.core.config import ConfigError, MethodConfig
from subtune.core.method import get_method
from subtune.data.loaders import calibration_batches, load_records
from subtune.eval.evaluate import EvalResult, evaluate
from subtune.train.trainer import build_trainer

# Demo settings per method on the embedded model: learning rates from a short sweep on the commonsense task (each
# method needs its own: full FT far less than adapters; LaMDA's orthonormal projections and S²FT's slices more), and
# budgets of the same order as LoRA r=16 (5.5% of the model). Zeroth-order methods get 3× the steps: a ZO step costs
# two forwards and no backward, and ZO needs many more steps than gradient methods (MeZO: 2×, it perturbs every
# weight four times a step).
DEMO_METHODS: dict[str, dict[str, Any]] = {
    "full": {"lr": 3e-4},
    "lora": {"lr": 5e-3},
    "dora": {"lr": 5e-3},
    "s2ft": {"lr": 2e-2, "config": {"o_ratio": 0.25, "v_ratio": 0.5, "d_ratio": 0.1, "u_ratio": 0.1}},
    "smt": {"lr": 1e-2, "config": {"block_size": 32, "ratio": 0.05, "warmup_steps": 8}},
    "lamda": {"lr": 2e-2, "config": {"r": 16}},
    "lamda++": {"lr": 2e-2, "config": {"r": 16, "rank_min": 8, "rank_max": 64}},
    "senszo": {"lr": 1e-2, "steps_factor": 3, "config": {"calibration_source": "train", "calibration_samples": 16}},
    "mezo": {"lr": 1e-4, "steps_factor": 2},
}


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def make_config(method_id: str, file_values: dict[str, Any] | None = None,
                overrides: dict[str, Any] | None = None) -> MethodConfig:
    """Method defaults, then the file's values, then CLI overrides (strings are parsed to each field's type)."""
    method = get_method(method_id)
    merged = {**(file_values or {}), **(overrides or {})}
    merged.pop("method", None)
    return method.config_class.from_dict({"method": method_id, **merged})


def finetune(model, tokenizer, config: MethodConfig, train_records: list[dict], output_dir: str | Path,
             resume: bool | str = False, **train_kwargs):
    """prepare -> Trainer.train -> save the adapter to output_dir/adapter. Returns (model, trainer)."""
    calibration = None
    wanted = get_method(config.method).calibration_batches(config)
    if wanted and getattr(config, "calibration_source", "train") == "corpus":
        from subtune.zoo import corpus_calibration

        calibration = corpus_calibration(tokenizer, samples=wanted)
    elif wanted:  # the first training batches (SMT: its warm-up)
        calibration = calibration_batches(tokenizer, train_records, batch_size=train_kwargs.get("batch_size", 16),
                                          num_batches=wanted)
    api.prepare(model, config, calibration=calibration)
    trainer = build_trainer(model, tokenizer, train_records, output_dir, **train_kwargs)
    if not train_kwargs.get("progress", True):
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # quiet: no per-log-step dicts on stdout
    trainer.train(resume_from_checkpoint=resume or None)
    api.save(model, Path(output_dir) / "adapter")
    return model, trainer


@dataclass
class DemoRow:
    method: str
    trainable: int
    percent: float
    before: float
    after: float
    perplexity: float
    seconds: float


def run_demo(task: str = "commonsense", methods: list[str] | None = None, steps: int = 80, batch_size: int = 8,
             limit: int | None = 100, output_dir: str | Path = "runs/demo", progress: bool = True,
             model_name: str = "default") -> tuple[EvalResult, list[DemoRow]]:
    """Zero-shot accuracy of the embedded model, then each method fine-tuned for `steps` and evaluated."""
    from subtune.zoo import load_model

    methods = methods or list(DEMO_METHODS)
    train = load_records(task, "train")
    test = load_records(task, "test", need_answer=True)[:limit]
    base, tokenizer = load_model(model_name)
    before = evaluate(base, tokenizer, test, with_perplexity=False, progress=False)
    rows = []
    for method_id in methods:
        settings = DEMO_METHODS.get(method_id, {"lr": get_method(method_id).default_lr})
        model = copy.deepcopy(base)
        start = time.perf_counter()
        method_steps = steps * settings.get("steps_factor", 1)
        if progress:
            print(f"[demo] {method_id}: {method_steps} steps, lr {settings['lr']:g}", flush=True)
        finetune(model, tokenizer, make_config(method_id, settings.get("config")), train,
                 Path(output_dir) / method_id, max_steps=method_steps, learning_rate=settings["lr"],
                 batch_size=batch_size, logging_steps=max(method_steps // 4, 1), save_strategy="no", progress=False)
        seconds = time.perf_counter() - start
        after = evaluate(model, tokenizer, test, progress=False)
        summary = api.trainable_summary(model)
        rows.append(DemoRow(method_id, summary.trainable, summary.percent, before.accuracy, after.accuracy,
                            after.perplexity or float("nan"), seconds))
    return before, rows


def format_demo_table(task: str, rows: list[DemoRow]) -> str:
    lines = [f"task: {task}",
             "| method | trainable | % of base | accuracy before | accuracy after | test ppl | train s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.trainable:,} | {r.percent:.2f} | {100 * r.before:.1f}% | "
                     f"{100 * r.after:.1f}% | {r.perplexity:.2f} | {r.seconds:.0f} |")
    return "\n".join(lines)
