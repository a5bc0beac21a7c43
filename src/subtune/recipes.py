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
from subtune.core.method import get_method, registered_methods
from subtune.data.calibration import calibration_for
from subtune.data.loaders import load_records
from subtune.eval.evaluate import EvalResult, evaluate
from subtune.train.trainer import build_trainer


def demo_methods() -> dict[str, dict[str, Any]]:
    """{method id: its demo settings} for every registered method that has some (`Method.demo`), in registry order.

    The settings live with each method: learning rates from a short sweep on the embedded commonsense task (full FT
    needs far less than adapters; LaMDA's orthonormal projections and S²FT's slices more), budgets of the order of
    LoRA r=16 (5.5% of the model). The zeroth-order methods have none: they need hundreds of ZO steps to move accuracy
    (`demo_left_out`; `subtune repro senszo` measures them).
    """
    return {m.id: copy.deepcopy(m.demo) for m in registered_methods() if m.demo is not None}


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The mapping in a YAML/JSON config file; any problem is a ConfigError naming the file (and line)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + (" (it is a directory)" if path.is_dir() else "")
                          + "; pass a YAML or JSON file of config fields")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: byte {e.start} is not valid UTF-8; save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read it ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and context_mark is not None:
            problem += f"; {context} opened at line {context_mark.line + 1}"
        raise ConfigError(f"config file {path}{where}: invalid YAML ({problem}); fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, not a {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config file {path}: keys must be field names (strings), got {bad[:3]}")
    return data


def make_config(method_id: str, file_values: dict[str, Any] | None = None,
                overrides: dict[str, Any] | None = None) -> MethodConfig:
    """Method defaults, then the file's values, then CLI overrides (strings are parsed to each field's type)."""
    method = get_method(method_id)
    file_values = dict(file_values or {})
    file_method = file_values.pop("method", method_id)
    if file_method != method_id:
        raise ConfigError(f"the config file is for method {file_method!r} but the method is {method_id!r}; "
                          "make them agree or drop 'method' from the file")
    merged = {**file_values, **(overrides or {})}
    merged.pop("method", None)
    return method.config_class.from_dict({"method": method_id, **merged})


def finetune(model, tokenizer, config: MethodConfig, train_records: list[dict], output_dir: str | Path,
             resume: bool | str = False, *, seed: int | None = None, overwrite: bool = False,
             option_names: dict[str, str] | None = None, on_prepared=None, **train_kwargs):
    """prepare -> Trainer.train -> save the adapter to output_dir/adapter. Returns (model, trainer).

    Everything is checked before any work: the training numbers, the output directory (writable; holding no other
    run unless `overwrite`), the run a `resume` continues (True: the newest complete checkpoint, or a checkpoint
    path; same method, config, base and selection), answers cut by `max_length`. `seed` (default config.seed) seeds
    every RNG before `prepare` (selection, PEFT's init, the Trainer's data order) and becomes config.seed unless the
    config sets its own, so two identical calls write byte-identical adapters. `option_names` spells the options
    in error messages as the caller's user knows them (the CLI: its flags). `on_prepared(model)` runs once after
    `prepare`, before the first step (the CLI prints the method's selection summary there).
    """
    import transformers

    from subtune.train import runs
    from subtune.train import zo
    from subtune.train.trainer import DEFAULT_MAX_LENGTH, check_answers_fit, check_training_args, resolve_seed

    output_dir = Path(output_dir)
    names = option_names or {}
    config, seed = resolve_seed(config, seed)
    # ZO: an "auto" objective becomes choice on multiple-choice records; a choice run holds out its dev split
    config = zo.resolve_objective(config, train_records)
    train_records, dev_records = zo.dev_split(config, train_records)
    check_training_args(names, **train_kwargs)
    runs.check_output_dir(output_dir, resume=bool(resume), overwrite=overwrite, any_run=False)
    checkpoint, partial = None, []
    if resume:
        checkpoint, partial = runs.find_resume_checkpoint(output_dir, None if resume is True else resume)
        runs.check_resume_config(checkpoint, config)
    elif not overwrite:
        _check_final_save(model, config, output_dir)
    check_answers_fit(tokenizer, train_records, train_kwargs.get("max_length", DEFAULT_MAX_LENGTH),
                      train_kwargs.get("train_on_inputs", False), names.get("max_length", "max_length"))
    transformers.set_seed(seed)
    # the method's source: the first training batches (e.g. SMT's warm-up) or the embedded corpus (SensZOQ)
    calibration = calibration_for(config, tokenizer, train_records, batch_size=train_kwargs.get("batch_size", 16))
    api.prepare(model, config, calibration=calibration)
    if checkpoint is not None:
        runs.check_resume_selection(model, checkpoint)
        _check_final_save(model, config, output_dir)
    if on_prepared is not None:
        on_prepared(model)
    trainer = build_trainer(model, tokenizer, train_records, output_dir, seed=seed, **train_kwargs)
    zo.add_best_dev(trainer, tokenizer, config, dev_records)  # best-dev values restored at the end (dev, not test)
    if not train_kwargs.get("progress", True):
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # quiet: no per-log-step dicts on stdout
    # all checks passed: now drop what is garbage (incomplete checkpoints) or what the caller asked to replace;
    # under a launcher rank 0 deletes (and, in the Trainer and api.save, writes) while the others wait
    from subtune.core import distributed

    if distributed.is_main_process():
        runs.remove_checkpoints(partial + ([p for _, p in runs.checkpoints(output_dir)] if overwrite else []))
    distributed.barrier()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    best = getattr(trainer, "best_dev", None)
    if best is not None and train_kwargs.get("progress", True) and distributed.is_main_process():
        point = best.best
        print(f"best dev choice loss {point['dev_choice_loss']:.4f} (ranking accuracy "
              f"{100 * point['dev_ranking_accuracy']:.1f}%) at step {point['step']} of {trainer.state.global_step}: "
              "those values are restored and saved" + (" (the untouched model)" if point["step"] == 0 else ""))
    api.save(model, output_dir / "adapter", overwrite=overwrite)
    return model, trainer


def _check_final_save(model, config: MethodConfig, output_dir: Path) -> None:
    """The final save refuses an adapter of another method or base model in output_dir: say so before training."""
    from subtune.core.fingerprint import fingerprint
    from subtune.core.guards import check_save_target

    state = getattr(model, api.STATE_ATTR, None)  # prepared: its fingerprint was taken before any change
    check_save_target(output_dir / "adapter", config.method, state.fingerprint if state else fingerprint(model))


@dataclass
class DemoRow:
    method: str
    trainable: int
    percent: float
    before: float
    after: float
    perplexity: float
    seconds: float
    # candidate-ranking accuracy (tasks with choices; None otherwise) and why a metric fell, if one did
    ranking_before: float | None = None
    ranking_after: float | None = None
    note: str = ""


def run_demo(task: str = "commonsense", methods: list[str] | None = None, steps: int = 80, batch_size: int = 8,
             limit: int | None = 100, output_dir: str | Path = "runs/demo", progress: bool = True,
             model_name: str = "default") -> tuple[EvalResult, list[DemoRow]]:
    """Zero-shot accuracy of the embedded model, then each method fine-tuned for `steps` and evaluated: generation
    accuracy, and candidate-ranking accuracy on tasks with choices (what the zeroth-order methods optimise)."""
    from subtune.zoo import load_model

    settings_of = demo_methods()
    methods = methods or list(settings_of)
    train = load_records(task, "train")
    test = load_records(task, "test", need_answer=True)[:limit]
    base, tokenizer = load_model(model_name)
    before = evaluate(base, tokenizer, test, with_perplexity=False, progress=False)
    rows = []
    for method_id in methods:
        settings = settings_of.get(method_id) or {"lr": get_method(method_id).default_lr}
        model = copy.deepcopy(base)
        start = time.perf_counter()
        method_steps = steps * settings.get("steps_factor", 1)
        if progress:
            print(f"[demo] {method_id}: {method_steps} steps, lr {settings['lr']:g}", flush=True)
        config = make_config(method_id, settings.get("config"))
        finetune(model, tokenizer, config, train, Path(output_dir) / method_id, max_steps=method_steps,
                 learning_rate=settings["lr"], batch_size=batch_size, logging_steps=max(method_steps // 4, 1),
                 save_strategy="no", progress=False)
        seconds = time.perf_counter() - start
        after = evaluate(model, tokenizer, test, progress=False)
        summary = api.trainable_summary(model)
        rows.append(DemoRow(method_id, summary.trainable, summary.percent, before.accuracy, after.accuracy,
                            after.perplexity or float("nan"), seconds, before.ranking_accuracy,
                            after.ranking_accuracy, _drop_note(before, after, api.state_of(model))))
    return before, rows


def _drop_note(before: EvalResult, after: EvalResult, state) -> str:
    """Why a row's metric is below the untouched model's, from what the run optimised ("" when none fell)."""
    objective = state.method.objective(state.config)  # finetune resolved "auto" before prepare
    notes = []
    if after.accuracy < before.accuracy:
        notes.append("generation below zero-shot: " + ("this run optimised candidate ranking, not the generated "
                                                        "answer" if objective == "choice" else
                                                        "too few steps or too high an lr for this method"))
    if after.ranking_accuracy is not None and after.ranking_accuracy < before.ranking_accuracy:
        notes.append("ranking below zero-shot: " + ("the best-dev values were no better on these test questions"
                                                     if objective == "choice" else "it trains the answer's "
                                                     "likelihood, which also shifts the distractors' scores"))
    return "; ".join(notes)


def demo_left_out() -> list[str]:
    """The zeroth-order methods the default demo leaves out (no `demo` settings): they need hundreds of ZO steps to
    move accuracy, far beyond the demo's minutes; `subtune repro senszo` measures them."""
    return [m.id for m in registered_methods() if m.zeroth_order and m.demo is None]


def format_demo_table(task: str, rows: list[DemoRow]) -> str:
    ranking = any(r.ranking_before is not None for r in rows)
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    head = "| method | trainable | % of base | accuracy before | accuracy after |"
    rule = "|---|---:|---:|---:|---:|"
    if ranking:
        head, rule = head + " ranking before | ranking after |", rule + "---:|---:|"
    lines = [f"task: {task}", head + " test ppl | train s | note |", rule + "---:|---:|---|"]
    for r in rows:
        cells = f"| {r.method} | {r.trainable:,} | {r.percent:.2f} | {pct(r.before)} | {pct(r.after)} |"
        if ranking:
            cells += f" {pct(r.ranking_before)} | {pct(r.ranking_after)} |"
        lines.append(cells + f" {r.perplexity:.2f} | {r.seconds:.0f} | {r.note} |")
    left_out = [m for m in demo_left_out() if m not in {r.method for r in rows}]
    if left_out:
        lines.append(f"\nNot in this table: {', '.join(left_out)} (zeroth-order: hundreds of ZO steps to move "
                     "accuracy on this model, beyond the demo's minutes). `subtune repro senszo` trains them on the "
                     "choice objective with best-dev selection and reports candidate-ranking accuracy with seeds; "
                     "`subtune demo --methods <id>` runs one here anyway.")
    return "\n".join(lines)
