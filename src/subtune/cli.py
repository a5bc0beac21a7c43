"""`subtune train | eval | demo | export | methods` — a thin layer over the library."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click

from subtune.train.options import LR_SCHEDULERS, REPORT_TO

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXTRA = {"ignore_unknown_options": True, "allow_extra_args": True}


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--r', '8', '--lora_alpha=16'] -> {'r': '8', 'lora_alpha': '16'} (values are typed by the config)."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise click.UsageError(f"unexpected argument {arg!r}; method options are given as --key value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        key = key.replace("-", "_")
        if key in out:
            raise click.UsageError(f"--{key} is given twice ({out[key]!r} and {value!r}); give it once")
        out[key] = value
    return out


def _fail_cleanly(fn):
    """Show subtune's own errors (SubtuneError and its subclasses, raised on purpose with a message that names the
    fix) as one line; anything else is a bug and keeps its traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from subtune.core.errors import SubtuneError

        try:
            return fn(*args, **kwargs)
        except SubtuneError as e:
            raise click.ClickException(" ".join(str(e).split("\n"))) from None

    return wrapper


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (a nan passes every comparison)."""

    def convert(self, value, param, ctx):
        import math

        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number.", param, ctx)
        return rv


def echo_main(message: str) -> None:
    """click.echo on rank 0 only: under a launcher (torchrun, accelerate launch) every rank runs the command."""
    from subtune.core.distributed import is_main_process

    if is_main_process():
        click.echo(message)


def check_writable(path: str | Path, flag: str, is_file: bool = False) -> None:
    """Fail before any work if `path` cannot be written (a file output must not be an existing directory)."""
    from subtune.core import io
    from subtune.core.errors import AdapterSaveError

    path = Path(path)
    if is_file and path.is_dir():
        raise click.BadParameter(f"{path} is a directory; give a file path", param_hint=f"'{flag}'")
    try:
        io.check_writable(path.parent if is_file else path, what="path")
    except AdapterSaveError as e:
        raise click.BadParameter(str(e), param_hint=f"'{flag}'") from None


def resolve_device(device: str, flag: str = "--device") -> str:
    """'cpu' | 'cuda' | 'auto' -> the device to run on; 'cuda' without a visible CUDA device fails now."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is visible to torch; use --device cpu (or auto)",
                                 param_hint=f"'{flag}'")
    return device


def method_list_option(value: str | None, flag: str) -> list[str] | None:
    """Comma-separated method ids (a '@variant' suffix allowed), each checked against the registry up front."""
    from subtune.core.method import get_method

    if value is None:
        return None
    ids = [m.strip() for m in value.split(",") if m.strip()]
    if not ids:
        raise click.BadParameter("no method id given; name at least one (see `subtune methods`)",
                                 param_hint=f"'{flag}'")
    for m in ids:
        get_method(m.partition("@")[0])  # UnknownMethodError lists the available ids
    return ids


@contextlib.contextmanager
def one_line_warnings():
    """Python warnings as one `warning: ...` line on stderr (no source line) while a command runs; the previous
    display is put back afterwards (a scope, so a program that calls the CLI keeps its own)."""
    import warnings

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        click.echo(f"warning: {' '.join(str(message).split())}", err=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


@click.group(help="Fine-tune LLaMA-family models by training a small, well-chosen part of them.")
@click.version_option(package_name="subtune")
@click.pass_context
def main(ctx) -> None:
    from subtune.core.notices import hold_back_4bit_notice

    hold_back_4bit_notice()  # bitsandbytes' CPU-kernel note shows only when a 4-bit layer is built
    ctx.with_resource(one_line_warnings())


@main.command()
@click.argument("method_id", required=False, metavar="[METHOD]")
@_fail_cleanly
def methods(method_id) -> None:
    """List the available methods and their papers; with METHOD, its options (config fields) and default lr."""
    from subtune.core.method import available_methods, get_method

    if method_id is not None:
        get_method(method_id)  # an unknown id fails with the list of methods
        click.echo(method_options_text(method_id))
        return
    for mid in available_methods():
        click.echo(f"{mid:10s} {get_method(mid).paper}")


def _peek_method(args: list[str]) -> str | None:
    """The value of --method in raw args (before click parses them), for `train --method M --help`."""
    for i, arg in enumerate(args):
        if arg == "--method" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return None


class MethodHelpCommand(click.Command):
    """A command whose --help also lists the config fields of the method named by --method (after the usual
    help), e.g. `subtune train --method s2ft --help`."""

    def parse_args(self, ctx, args):
        ctx.meta["subtune.method"] = _peek_method(args)
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter):
        super().format_help(ctx, formatter)
        method_id = ctx.meta.get("subtune.method")
        if method_id:
            formatter.write("\n" + method_options_text(method_id) + "\n")  # as is: a table, not a paragraph


def config_fields(config_class) -> list[tuple[str, str, str, str]]:
    """(name, type, default, one-line help) of each field of a method config dataclass. The help is the field's
    trailing `# comment` in the class source (the nearest class that declares it), when there is one."""
    import dataclasses
    import inspect
    import re
    import typing

    from subtune.core.config import _describe

    comments: dict[str, str] = {}
    for cls in reversed(config_class.__mro__):  # subclasses' comments win
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        comments.update(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, re.M))
    hints = typing.get_type_hints(config_class)
    rows = []
    for f in dataclasses.fields(config_class):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((f.name, _describe(hints[f.name], article=False), json.dumps(default),
                     comments.get(f.name, "").split("  #")[0].strip()))
    return rows


def method_options_text(method_id: str) -> str:
    """The method's config fields as a table (field, type, default, help) with its default lr: what
    `subtune methods M` and `subtune train --method M --help` print."""
    from subtune.core.errors import SubtuneError
    from subtune.core.method import get_method

    try:
        method = get_method(method_id)
    except SubtuneError as e:
        return str(e)
    rows = config_fields(method.config_class)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"Method options of {method_id} ({method.paper or 'no paper'}); default --lr {method.default_lr:g}.",
             "Give them as --key value or --method-opt key=value:", ""]
    for name, kind, default, help_ in rows:
        lines.append(f"  {name:<{widths[0]}}  {kind:<{widths[1]}}  {default:<{widths[2]}}  {help_}".rstrip())
    return "\n".join(lines)


TRAIN_OPTION_ALIASES = {  # Trainer / TrainingArguments spellings -> the train command's flag
    "learning_rate": "--lr", "num_train_epochs": "--epochs", "per_device_train_batch_size": "--batch-size",
    "gradient_accumulation_steps": "--grad-accum", "lr_scheduler_type": "--lr-scheduler", "warmup": "--warmup-steps",
    "eval_dataset": "--eval-data", "output_dir": "--output", "bf16": "--dtype bf16",
    "resume_from_checkpoint": "--resume",
}


def method_overrides(ctx, method_id: str, extra: list[str], method_opts: tuple[str, ...]) -> dict[str, str]:
    """Method config fields from extra `--key value` args and `--method-opt key=value`; a key that is no field
    of the method but a training option (another spelling of a flag) gets a UsageError naming the flag."""
    import dataclasses

    from subtune.core.method import get_method

    overrides = parse_overrides(extra)
    for opt in method_opts:
        key, sep, value = opt.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise click.BadParameter(f"{opt!r} is not key=value; give e.g. --method-opt d_ratio=0.05",
                                     param_hint="'--method-opt'")
        if key in overrides:
            raise click.UsageError(f"{key} is given twice ({overrides[key]!r} and {value!r}); give it once")
        overrides[key] = value
    fields = sorted(f.name for f in dataclasses.fields(get_method(method_id).config_class))
    flags = {opt.lstrip("-").replace("-", "_"): opt for p in ctx.command.params for opt in p.opts
             if opt.startswith("--")}
    for key in overrides:
        flag = flags.get(key) or TRAIN_OPTION_ALIASES.get(key)
        if key not in fields and flag:
            raise click.UsageError(f"--{key} is not a {method_id} option but a training option: use {flag}. "
                                   f"{method_id}'s options: {', '.join(fields)} (see `subtune methods {method_id}`)")
    return overrides


def eval_records_option(value: str | None, flag: str = "--eval-data") -> list[dict] | None:
    """--eval-data: a JSON/JSONL file, or an embedded task's held-out split: TASK (its dev or validation split)
    or TASK:SPLIT. Never the training split by accident."""
    from subtune.core.errors import DataError
    from subtune.data.loaders import TASKS_DIR, load_records

    if value is None:
        return None
    task, sep, split = value.partition(":")
    if (TASKS_DIR / task).is_dir():
        if not sep:
            splits = sorted(p.stem for p in (TASKS_DIR / task).glob("*.json"))
            held_out = [s for s in ("dev", "validation") if s in splits]
            if not held_out:
                raise DataError(f"{flag} {task}: the embedded task has no dev/validation split (it has {splits}); "
                                f"name a split as {task}:SPLIT (e.g. {task}:test, which then is no longer a clean "
                                "test set) or give a JSON/JSONL file of held-out records")
            split = held_out[0]
        return load_records(task, split)
    return load_records(value)


@main.command(cls=MethodHelpCommand, context_settings=EXTRA)
@click.option("--method", required=True, help="method id (see `subtune methods`; `--method M --help` lists M's "
                                              "options)")
@click.option("--model", "model_name", default="default", show_default=True, help="'default' or a local HF directory")
@click.option("--data", default="arithmetic", show_default=True, help="embedded task name or a .json/.jsonl file")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML/JSON file of method config fields (CLI --key value wins)")
@click.option("--method-opt", "method_opts", multiple=True, metavar="KEY=VALUE",
              help="a method config field (repeatable); the same as an extra --KEY VALUE")
@click.option("--output", default=None, help="run directory [runs/<method>]")
@click.option("--max-steps", type=int, default=-1, show_default=True, help="-1: run --epochs")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--lr", type=float, default=None, help="learning rate [the method's default_lr]")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="linear warm-up over this many optimizer steps [--warmup-ratio 0.03]")
@click.option("--warmup-ratio", type=FiniteFloatRange(0.0, 1.0, max_open=True), default=None,
              help="warm-up over this fraction of the run [0.03]")
@click.option("--lr-scheduler", type=click.Choice(LR_SCHEDULERS), default="linear", show_default=True,
              help="transformers' schedule (reduce_lr_on_plateau, greedy: on eval_loss, need --eval-data)")
@click.option("--weight-decay", type=FiniteFloatRange(min=0.0), default=0.0, show_default=True)
@click.option("--max-grad-norm", type=FiniteFloatRange(min=0.0), default=1.0, show_default=True,
              help="clip the gradient norm (0: no clipping)")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="base weights dtype (trainable values stay fp32)")
@click.option("--max-length", type=int, default=256, show_default=True)
@click.option("--logging-steps", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--save-steps", type=int, default=500, show_default=True)
@click.option("--eval-data", default=None,
              help="held-out records for eval_loss during training: a .json/.jsonl file, an embedded task (its "
                   "dev/validation split) or TASK:SPLIT")
@click.option("--eval-steps", type=click.IntRange(min=1), default=None,
              help="evaluate every N steps [--logging-steps; with early stopping --save-steps]")
@click.option("--early-stopping-patience", type=click.IntRange(min=1), default=None,
              help="stop after N evaluations without a lower eval_loss and keep the best checkpoint's adapter")
@click.option("--report-to", type=click.Choice(list(REPORT_TO)), default="none", show_default=True,
              help="also log to TensorBoard or Weights & Biases (the package must be installed)")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--fsdp", is_flag=True, help="under a launcher on GPUs: shard the base with FSDP2 (docs/DISTRIBUTED.md)")
@click.option("--resume", is_flag=True, help="continue the run in --output from its newest complete checkpoint")
@click.option("--overwrite", is_flag=True, help="replace another run in --output (its adapter and checkpoints)")
@click.option("--seed", type=int, default=None,
              help="seeds every RNG (selection, init, data order) and the config's seed unless it sets one [0]")
@click.pass_context
@_fail_cleanly
def train(ctx, method, model_name, data, config_file, method_opts, output, max_steps, epochs, lr, batch_size,
          grad_accum, warmup_steps, warmup_ratio, lr_scheduler, weight_decay, max_grad_norm, dtype, max_length,
          logging_steps, save_steps, eval_data, eval_steps, early_stopping_patience, report_to,
          gradient_checkpointing, resume, overwrite, seed, fsdp) -> None:
    """Fine-tune with the HF Trainer; method config fields are extra `--key value` options (e.g. --r 8) or
    `--method-opt key=value`."""
    import warnings

    from subtune.core.api import state_of, trainable_summary
    from subtune.core.distributed import trainer_fsdp_args
    from subtune.core.method import get_method
    from subtune.data.loaders import load_records
    from subtune.recipes import finetune, make_config, read_config_file
    from subtune.train import runs
    from subtune.train.trainer import CLI_FLAGS, check_training_args
    from subtune.zoo import load_model

    # everything that can be checked is checked here, before the model is loaded
    overrides = method_overrides(ctx, method, ctx.args, method_opts)
    file_values = read_config_file(config_file)
    if seed is not None and "seed" not in file_values and "seed" not in overrides:
        overrides["seed"] = str(seed)  # --seed is the config's seed unless the config sets its own
    config = make_config(method, file_values, overrides)
    lr = lr if lr is not None else get_method(method).default_lr
    if warmup_steps is not None and warmup_ratio is not None:
        raise click.UsageError("--warmup-steps and --warmup-ratio both set the warm-up; give one of them")
    warmup = warmup_steps if warmup_steps is not None else warmup_ratio if warmup_ratio is not None else 0.03
    eval_records = eval_records_option(eval_data)
    trainer_args = dict(max_steps=max_steps, epochs=epochs, learning_rate=lr, batch_size=batch_size,
                        grad_accum=grad_accum, save_steps=save_steps, max_length=max_length, warmup=warmup,
                        lr_scheduler=lr_scheduler, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                        logging_steps=logging_steps, eval_records=eval_records, eval_steps=eval_steps,
                        early_stopping_patience=early_stopping_patience, report_to=report_to)
    check_training_args(CLI_FLAGS, **trainer_args)
    trainer_args.update(trainer_fsdp_args(fsdp))  # refused on the CPU, before the model loads
    from subtune.train.zo import resolve_objective  # ZO "auto": choice on multiple-choice records, else lm

    config = resolve_objective(config, load_records(data, "train"))
    if eval_records is not None and get_method(method).objective(config) == "choice":
        raise click.UsageError(f"--eval-data measures eval_loss with the LM objective, and {method} here trains the "
                               "choice objective; drop --eval-data (or set the method's objective to lm)")
    records = load_records(data, "train")
    output = Path(output or f"runs/{method}")
    runs.check_output_dir(output, resume=resume, overwrite=overwrite, any_run=True, names=runs.CLI_NAMES)
    if resume:
        with warnings.catch_warnings():  # finetune warns about skipped checkpoints, once
            warnings.simplefilter("ignore")
            checkpoint, _ = runs.find_resume_checkpoint(output, names=runs.CLI_NAMES)
        runs.check_resume_config(checkpoint, config, names=runs.CLI_NAMES)
    model, tokenizer = load_model(model_name, dtype)
    echo_main(f"method {method}: {config.to_json()}")

    def print_selection(prepared) -> None:  # once, after selection, before the first step
        state = state_of(prepared)
        summary = state.method.selection_summary(prepared, state)
        if summary:
            echo_main(summary)

    model, _ = finetune(model, tokenizer, config, records, output, resume=resume, overwrite=overwrite,
                        option_names=CLI_FLAGS, on_prepared=print_selection,
                        seed=seed if seed is not None else config.seed, bf16=dtype == "bf16",
                        gradient_checkpointing=gradient_checkpointing, **trainer_args)
    echo_main(str(trainable_summary(model)))
    echo_main(f"adapter saved to {output / 'adapter'}")


# how library error hints name their fixes when `subtune export` / `subtune eval` runs them (core/guards.API_NAMES)
EXPORT_FLAGS = {"merged": "--format merged", "fallback_svd": "--fallback svd", "max_rank": "--max-rank",
                "overwrite": "--overwrite", "allow_nonfinite": "--allow-nonfinite"}


@main.command(name="eval")
@click.option("--adapter", type=click.Path(file_okay=False), default=None, help="adapter dir (none: the base model)")
@click.option("--model", "model_name", default=None, help="base model ['default', or the adapter's base]")
@click.option("--task", default="arithmetic", show_default=True, help="embedded task or a .json/.jsonl test file")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="evaluate the first N records only")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=24, show_default=True)
@click.option("--predictions", type=click.Path(dir_okay=False), default=None, help="write per-example JSON here")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="base weights dtype")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="auto: cuda when torch sees one, else cpu")
@click.option("--allow-nonfinite", is_flag=True, help="evaluate an adapter holding NaN/inf values (a diverged run)")
@_fail_cleanly
def eval_cmd(adapter, model_name, task, split, limit, batch_size, max_new_tokens, predictions, dtype,
             device, allow_nonfinite) -> None:
    """Accuracy (generation + LLM-Adapters answer extraction) and perplexity of the reference answers."""
    from subtune.core import api
    from subtune.data.loaders import load_records
    from subtune.eval.evaluate import evaluate, report
    from subtune.zoo import adapter_base, load_model

    device = resolve_device(device)
    if predictions:
        check_writable(predictions, "--predictions", is_file=True)
    records = load_records(task, split, need_answer=True)[:limit]
    if model_name is None:
        model_name = adapter_base(adapter) if adapter else "default"  # the adapter's recorded base, from anywhere
    model, tokenizer = load_model(model_name, dtype)
    if adapter:
        api.load(model, adapter, allow_nonfinite=allow_nonfinite, option_names=EXPORT_FLAGS)
    model.to(device)
    result = evaluate(model, tokenizer, records, batch_size=batch_size, max_new_tokens=max_new_tokens)
    summary = report(result, task=task, split=split, adapter=adapter, dtype=dtype, device=device)
    click.echo(json.dumps(summary, indent=2, allow_nan=False))  # always valid JSON: non-finite values are null
    if predictions:
        Path(predictions).write_text(json.dumps(result.predictions, indent=1))


@main.command()
@click.option("--task", default="commonsense", show_default=True)
@click.option("--methods", "method_list", default=None, help="comma-separated [every method]")
@click.option("--steps", type=click.IntRange(min=1), default=80, show_default=True,
              help="optimizer steps per method")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True, help="test records to evaluate")
@click.option("--output", default="runs/demo", show_default=True)
@_fail_cleanly
def demo(task, method_list, steps, limit, output) -> None:
    """Fine-tune the embedded default model with every method and print accuracy before/after (~3 min on 2 cores)."""
    from subtune.data.loaders import load_records
    from subtune.recipes import format_demo_table, run_demo

    methods_ = method_list_option(method_list, "--methods")
    check_writable(output, "--output")
    for split in ("train", "test"):  # data errors before the model loads
        load_records(task, split, need_answer=split == "test")
    _, rows = run_demo(task, methods_, steps=steps, limit=limit, output_dir=output)
    click.echo(format_demo_table(task, rows))


SERVE_ONLY = {"widths": "--widths", "switch_presets": "--switch-presets", "adapter_counts": "--adapters",
              "rows": "--rows", "prompt_len": "--prompt-len", "new_tokens": "--new-tokens", "rounds": "--rounds",
              "gen_rounds": "--gen-rounds"}
TRAINING_ONLY = {"method_list": "--methods", "batch": "--batch", "seq": "--seq", "steps": "--steps",
                 "grad_checkpointing": "--grad-checkpointing", "budget": "--budget"}


def _given(ctx, names: dict[str, str]) -> list[str]:
    """The flags among `names` that the user actually gave (not left at their default)."""
    from click.core import ParameterSource

    return [flag for name, flag in names.items()
            if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]


def int_list_option(value: str, flag: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; 'none' or '' -> []."""
    if value.strip().lower() in ("", "none"):
        return []
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers (e.g. 1,4,16)",
                                 param_hint=f"'{flag}'") from None


@main.command()
@click.option("--methods", "method_list", default="full,lora,dora,s2ft", show_default=True,
              help="comma-separated method ids")
@click.option("--preset", default="134m", show_default=True, help="tiny|134m|llama2-7b|llama3-8b or a local HF dir")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seq", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True, help="timed optimizer steps")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True,
              help="untimed steps first (--serve: untimed switches [3])")
@click.option("--grad-checkpointing", is_flag=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--budget", type=click.IntRange(min=1), default=None,
              help="trainable values per method [LoRA r=16's count]")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads per run [torch's default]")
@click.option("--out", default="bench-out", show_default=True, help="directory for the table, JSON and PNG")
@click.option("--serve", is_flag=True,
              help="the serving bench instead: adapter switch time and mixed-batch generation, subtune vs PEFT LoRA")
@click.option("--widths", default="1024,2048,4096,8192,16384", show_default=True,
              help="--serve: square layer widths of the per-layer switch ('none': skip)")
@click.option("--switch-presets", default="llama2-7b:bf16", show_default=True,
              help="--serve: more whole-model switches besides --preset, NAME[@LAYERS][:DTYPE], comma-separated "
                   "('none': only --preset)")
@click.option("--adapters", "adapter_counts", default="1,4,16", show_default=True,
              help="--serve: adapters per mixed batch (K)")
@click.option("--rows", type=click.IntRange(min=1), default=16, show_default=True, help="--serve: batch rows")
@click.option("--prompt-len", type=click.IntRange(min=1), default=32, show_default=True,
              help="--serve: prompt tokens per row")
@click.option("--new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="--serve: greedy tokens generated per row")
@click.option("--rounds", type=click.IntRange(min=1), default=30, show_default=True,
              help="--serve: timed switches per system")
@click.option("--gen-rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="--serve: timed generate calls per system and K")
@click.pass_context
@_fail_cleanly
def bench(ctx, method_list, preset, batch, seq, dtype, steps, warmup, grad_checkpointing, device, budget, threads,
          out, serve, widths, switch_presets, adapter_counts, rows, prompt_len, new_tokens, rounds,
          gen_rounds) -> None:
    """Time and memory of every method side by side, with the floors (each configuration in a fresh process);
    with --serve, serving many adapters instead: switch time and mixed-batch tokens/s, subtune vs PEFT LoRA."""
    from subtune.bench.presets import preset_config

    wrong = _given(ctx, TRAINING_ONLY if serve else SERVE_ONLY)
    if wrong:
        raise click.UsageError(f"{', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} "
                               f"{'training-bench' if serve else '--serve'} option(s); "
                               f"{'drop them or drop --serve' if serve else 'add --serve or drop them'}")
    preset_config(preset)  # an unknown preset fails here (each run would only record it as its error)
    check_writable(out, "--out")
    resolve_device(device)
    if serve:
        from subtune.bench import serve as serve_bench

        spec = serve_bench.ServeBenchSpec(
            preset=preset, device=device, dtype=dtype, widths=int_list_option(widths, "--widths"),
            switch_presets=[] if switch_presets.strip().lower() in ("", "none") else
            [p.strip() for p in switch_presets.split(",") if p.strip()],
            adapter_counts=int_list_option(adapter_counts, "--adapters"), rows=rows, prompt_len=prompt_len,
            new_tokens=new_tokens, rounds=rounds, gen_rounds=gen_rounds, threads=threads,
            **({"warmup": warmup} if _given(ctx, {"warmup": "--warmup"}) else {}))
        serve_bench.check_spec(spec)  # every option before the first (minutes-long) job
        report = serve_bench.run_serve_bench(spec)
        paths = serve_bench.write_outputs(report, Path(out))
        click.echo(serve_bench.markdown_table(report))
        click.echo("\n" + "\n".join(f"{k}: {v}" for k, v in paths.items()))
        problems = serve_bench.guard_failures(report)
        if problems:
            raise click.ClickException("the serving bench's figures are not trustworthy: " + "; ".join(problems))
        return
    from subtune.bench import BenchSpec, markdown_table, run_bench, write_outputs

    methods_ = method_list_option(method_list, "--methods")  # unknown ids fail here, before any run
    report = run_bench(BenchSpec(methods=methods_, preset=preset, batch=batch, seq=seq, dtype=dtype, steps=steps,
                                 warmup=warmup, grad_checkpointing=grad_checkpointing, device=device, budget=budget,
                                 threads=threads))
    paths = write_outputs(report, Path(out))
    click.echo(markdown_table(report))
    click.echo("\n" + "\n".join(f"{k}: {v}" for k, v in paths.items()))


@main.command(name="plan")
@click.option("--model", "model_name", default="default", show_default=True,
              help="'default', a bench preset (134m, llama2-7b, llama3-8b, llama3-70b, ...) or a local HF directory")
@click.option("--method", "method_list", default="all", show_default=True, help="method id(s), comma-separated, or all")
@click.option("--world-size", type=click.IntRange(min=1), default=1, show_default=True, help="processes (GPUs)")
@click.option("--fsdp", is_flag=True, help="shard the base, trained values and optimizer state with FSDP2")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="per device")
@click.option("--seq-len", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="bf16", show_default=True, help="base weights")
@_fail_cleanly
def plan_cmd(model_name, method_list, world_size, fsdp, batch_size, seq_len, dtype) -> None:
    """Estimated memory per rank (weights, trained values, gradients, AdamW, activations) before launching."""
    from subtune.core.method import available_methods
    from subtune.plan import format_plans, plan

    ids = available_methods() if method_list.strip() == "all" else method_list_option(method_list, "--method")
    click.echo(format_plans(plan(model_name, ids, world_size=world_size, fsdp=fsdp, batch=batch_size, seq=seq_len,
                                 dtype=dtype), model_name))


@main.command(name="senszo-mask")
@click.option("--model", "model_name", default="default", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="mask file (.safetensors) to write")
@click.option("--density", type=FiniteFloatRange(0.0, 1.0, min_open=True), default=0.001, show_default=True)
@click.option("--samples", type=click.IntRange(min=1), default=100, show_default=True,
              help="calibration windows of --seq tokens")
@click.option("--seq", type=click.IntRange(min=2), default=512, show_default=True)
@click.option("--data", default=None, help="calibration text as a task/JSON file [the embedded pretraining corpus]")
@click.option("--scope", type=click.Choice(["per_matrix", "global"]), default="per_matrix", show_default=True)
@_fail_cleanly
def senszo_mask(model_name, out, density, samples, seq, data, scope) -> None:
    """Compute SensZOQ's sensitive-weight mask once and save it (reuse it with --mask_path for any task)."""
    from subtune.data.loaders import load_records
    from subtune.methods.senszo import SensZOConfig, build_mask
    from subtune.zoo import load_model

    config = SensZOConfig(density=density, scope=scope, calibration_samples=samples,
                          calibration_source="train" if data else "corpus")
    check_writable(out, "--out", is_file=True)
    records = load_records(data) if data else None  # data errors before the model loads
    model, tokenizer = load_model(model_name)
    mask = build_mask(model, config, out, tokenizer, records, seq=seq)
    click.echo(f"mask: {mask.selected:,} of {mask.total:,} weights ({100 * density:.3f}%) over {mask.matrices} "
               f"matrices -> {out}")


@main.command()
@click.option("--adapter", required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["lora", "merged"]), default="lora", show_default=True)
@click.option("--model", "model_name", default=None, help="base model ['default', or the adapter's base]")
@click.option("--max-rank", type=click.IntRange(min=1), default=512, show_default=True,
              help="refuse LoRA ranks above this (vLLM: 512)")
@click.option("--with-base", is_flag=True,
              help="--format lora: also copy the base model to OUT/base and point the adapter at it (self-contained)")
@click.option("--fallback", type=click.Choice(["error", "svd"]), default="error", show_default=True,
              help="--format lora: modules above --max-rank fail (error) or get their best rank-max SVD (svd)")
@click.option("--overwrite", is_flag=True, help="replace a subtune adapter in --out (an earlier export is replaced "
                                                "anyway)")
@click.option("--allow-nonfinite", is_flag=True, help="export an adapter holding NaN/inf values (a diverged run)")
@_fail_cleanly
def export(adapter, out, fmt, model_name, max_rank, with_base, fallback, overwrite, allow_nonfinite) -> None:
    """Export an adapter as an exact PEFT LoRA adapter, or as a merged HF model."""
    from subtune.core import api
    from subtune.zoo import adapter_base, load_model, write_base_copy

    if with_base and fmt != "lora":
        raise click.UsageError("--with-base is for --format lora (a merged export is a whole model already)")
    if fallback != "error" and fmt != "lora":
        raise click.UsageError("--fallback is for --format lora (a merged export is always exact)")
    check_writable(out, "--out")
    model_name = model_name or adapter_base(adapter)  # the adapter's recorded base, from any directory
    model, tokenizer = load_model(model_name)
    api.load(model, adapter, allow_nonfinite=allow_nonfinite, option_names=EXPORT_FLAGS)
    if fmt == "lora":
        base_copy = Path(out).resolve() / "base" if with_base else None
        info = api.export_lora(model, out, max_rank=max_rank, fallback=fallback, overwrite=overwrite,
                               allow_nonfinite=allow_nonfinite, base_path=str(base_copy) if base_copy else None,
                               option_names=EXPORT_FLAGS)
        if base_copy:
            write_base_copy(model_name, base_copy)
            info["base"] = str(base_copy)
        click.echo(json.dumps(info, indent=2))
    else:
        api.export_merged(model, out, tokenizer, overwrite=overwrite, allow_nonfinite=allow_nonfinite,
                          option_names=EXPORT_FLAGS)
        click.echo(f"merged model written to {out}")


def adapter_pairs(values: tuple[str, ...], base_id: str) -> list[tuple[str, Path]]:
    """['cs=runs/cs/adapter', ...] -> [(name, dir)], every name and directory checked before the model loads."""
    pairs: dict[str, Path] = {}
    for value in values:
        name, sep, directory = value.partition("=")
        name = name.strip()
        if not sep or not name or not directory:
            raise click.BadParameter(f"{value!r} is not NAME=DIR; give e.g. --adapter cs=runs/cs/adapter",
                                     param_hint="'--adapter'")
        if name in pairs or name == base_id:
            taken = "the base model's id (--model)" if name == base_id else "another adapter's name"
            raise click.BadParameter(f"adapter name {name!r} is {taken}; give each adapter its own name",
                                     param_hint="'--adapter'")
        if not Path(directory).is_dir():
            raise click.BadParameter(f"{directory} is not a directory; give the adapter directory that "
                                     "subtune train / subtune.save wrote", param_hint="'--adapter'")
        pairs[name] = Path(directory)
    return list(pairs.items())


@main.command(name="serve")
@click.option("--model", "model_name", default="default", show_default=True,
              help="'default' or a local HF directory; also the base's model id in /v1/models")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
              help="serve the adapter saved in DIR as model NAME (repeat for more)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (no authentication: keep loopback unless something guards the port)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="most prompts generated together in one batch")
@click.option("--batch-window-ms", type=FiniteFloatRange(min=0.0), default=5.0, show_default=True,
              help="how long a batch waits for more requests after its first one")
@click.option("--max-tokens-limit", type=click.IntRange(min=1), default=1024, show_default=True,
              help="largest max_tokens a request may ask for")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@_fail_cleanly
def serve_cmd(model_name, adapters, host, port, max_batch_size, batch_window_ms, max_tokens_limit, dtype) -> None:
    """OpenAI-compatible HTTP server (/v1/models, /v1/completions) for the base and its adapters, batched."""
    from subtune.serve import AdapterStore
    from subtune.serve import http
    from subtune.zoo import load_model, resolve_model_path

    pairs = adapter_pairs(adapters, model_name)
    resolve_model_path(model_name)
    http.bind(host, port).close()  # a port in use fails now, not after the model has loaded
    model, tokenizer = load_model(model_name, dtype)
    store = AdapterStore(model)
    for name, directory in pairs:
        store.add(name, directory)
        click.echo(f"adapter {name}: {directory} ({store.memory(name) / 2**20:.2f} MiB)")
    click.echo(f"serving {model_name!r} and {len(pairs)} adapter(s) on http://{host}:{port}/v1")
    http.serve(store, tokenizer, host=host, port=port, base_name=model_name, max_batch_size=max_batch_size,
               batch_window_ms=batch_window_ms, max_tokens_limit=max_tokens_limit)


from subtune.repro.cli import repro as _repro  # noqa: E402  (light: the claims load when the command runs)

main.add_command(_repro)

if __name__ == "__main__":
    sys.exit(main())
