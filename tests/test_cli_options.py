"""The CLI's Trainer options, method options, eval options, flag-naming error hints, and its quiet, fast start.

Runs on the embedded default model (3.7M parameters, a few steps each) through click's CliRunner; what a flag does
is checked where it lands (the TrainingArguments the run used, the log history it wrote, the adapter it saved).
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

import subtune
from reliability import Case, cases_param, check_case
from subtune.cli import main
from subtune.core import notices

QUICK = ["--max-steps", "2", "--batch-size", "4"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def cli(*args):
    """The CLI as a user runs it, raising its one-line error (click.ClickException) instead of exiting."""
    return main.main([str(a) for a in args], standalone_mode=False)


@pytest.fixture
def trainer_args(monkeypatch):
    """The TrainingArguments (and the trainer) of every run the CLI starts in this test."""
    import subtune.recipes

    seen = []
    real = subtune.recipes.build_trainer

    def spy(*args, **kwargs):
        trainer = real(*args, **kwargs)
        seen.append(trainer)
        return trainer

    monkeypatch.setattr(subtune.recipes, "build_trainer", spy)
    return seen


def log_history(run: Path) -> list[dict]:
    step = max(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    return json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]


# ------------------------------------------------------------------------------------------- a quiet, fast start

HEAVY = ("torch", "transformers", "peft", "bitsandbytes")


def test_help_and_import_load_no_torch_peft_or_bitsandbytes():
    code = ("import json, sys; import subtune.cli; from click.testing import CliRunner; "
            "r = CliRunner().invoke(subtune.cli.main, ['--help']); assert r.exit_code == 0, r.output; "
            "import subtune; subtune.__all__; dir(subtune); "
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_lazy_package_root_gives_every_public_name_and_registers_the_methods():
    assert set(subtune.__all__) <= set(dir(subtune))
    for name in subtune.__all__:
        assert getattr(subtune, name) is not None, name
    from subtune import S2FTConfig
    from subtune.methods.s2ft import S2FTConfig as defined

    assert S2FTConfig is defined and subtune.get_method("s2ft").config_class is S2FTConfig
    assert {"full", "lora", "dora", "s2ft", "smt", "lamda", "lamda++", "senszo", "mezo"} <= set(
        subtune.available_methods())
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        subtune.nope


def test_the_4bit_notice_is_held_back_until_a_4bit_layer_is_built(caplog):
    logger = logging.getLogger(notices.BNB_CPU_LOGGER)
    notices.hold_back_4bit_notice()
    try:
        with caplog.at_level(logging.WARNING, logger=notices.BNB_CPU_LOGGER):
            logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: test")
            assert "gemm_4bit_forward" not in caplog.text
            from subtune.ops.sparse import quantize_nf4

            quantize_nf4(torch.randn(64, 64), None, torch.float32)
            assert caplog.text.count("gemm_4bit_forward") == 1
    finally:
        notices.release_4bit_notice()


def test_cli_start_holds_the_notice_back():
    notices.release_4bit_notice()
    assert invoke("methods").exit_code == 0
    held = [f for f in logging.getLogger(notices.BNB_CPU_LOGGER).filters if isinstance(f, notices._HoldBack)]
    notices.release_4bit_notice()
    assert len(held) == 1


# ------------------------------------------------------------------------------------- Trainer options pass through

def test_trainer_options_reach_the_training_arguments_and_the_schedule(tmp_path, trainer_args):
    run = tmp_path / "run"
    result = invoke("train", "--method", "s2ft", "--max-steps", 6, "--batch-size", 2, "--output", run, "--lr", "0.01",
                    "--warmup-steps", 5, "--lr-scheduler", "constant_with_warmup", "--weight-decay", "0.1",
                    "--max-grad-norm", "0.5", "--logging-steps", 1, "--save-steps", 6, "--d_ratio", "0.02")
    assert result.exit_code == 0, result.output
    args = trainer_args[0].args
    assert (args.warmup_steps, args.lr_scheduler_type.value, args.weight_decay, args.max_grad_norm,
            args.logging_steps, args.report_to) == (5, "constant_with_warmup", 0.1, 0.5, 1, [])
    steps = [h for h in log_history(run) if "loss" in h]
    # the lr each step k (from 1) trained with: warm-up (k - 1)/5 of --lr over 5 steps, then constant
    assert [h["learning_rate"] for h in steps] == pytest.approx([0.01 * min(1.0, (k - 1) / 5) for k in range(1, 7)])
    assert all("grad_norm" in h for h in steps)  # a gradient method logs its norm (the ZO test's reference)


def test_the_scheduler_choices_are_transformers_schedules_that_need_no_extra_kwargs():
    from transformers import SchedulerType, get_scheduler

    from subtune.train.options import LR_SCHEDULERS, METRIC_SCHEDULERS

    needs_kwargs = {"cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"}
    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType} - needs_kwargs
    assert set(METRIC_SCHEDULERS) <= set(LR_SCHEDULERS)
    for name in LR_SCHEDULERS:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        get_scheduler(name, opt, num_warmup_steps=1, num_training_steps=10)
    for name in needs_kwargs:
        with pytest.raises((ValueError, TypeError)):
            get_scheduler(name, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), num_warmup_steps=1,
                          num_training_steps=10)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_early_stopping_keeps_the_best_checkpoints_adapter(tmp_path, trainer_args):
    """Train on arithmetic, evaluate on commonsense questions: eval_loss falls, then rises; patience 1 stops one
    evaluation after the best, and the adapter saved at the end is the best checkpoint's, not the last step's."""
    from subtune.data.loaders import load_records

    evalset = _jsonl(tmp_path / "dev.jsonl", load_records("commonsense", "test")[:16])
    run = tmp_path / "run"
    result = invoke("train", "--method", "s2ft", "--max-steps", 12, "--batch-size", 8, "--lr", "0.05",
                    "--d_ratio", "0.05", "--output", run, "--eval-data", evalset, "--eval-steps", 1,
                    "--save-steps", 1, "--early-stopping-patience", 1, "--logging-steps", 1)
    assert result.exit_code == 0, result.output
    state = trainer_args[0].state
    losses = [(h["step"], h["eval_loss"]) for h in state.log_history if "eval_loss" in h]
    best_step = min(losses, key=lambda sl: sl[1])[0]
    assert state.global_step == best_step + 1 < 12  # stopped early, one evaluation after the best
    assert state.best_model_checkpoint == str(run / f"checkpoint-{best_step}")
    final = subtune.read_deltas(run / "adapter")
    best = subtune.read_deltas(run / f"checkpoint-{best_step}" / "adapter")
    last = subtune.read_deltas(run / f"checkpoint-{state.global_step}" / "adapter")
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k].to_dense(), best[k].to_dense()) for k in final)
    assert not all(torch.equal(final[k].to_dense(), last[k].to_dense()) for k in final)


def test_eval_data_takes_an_embedded_tasks_held_out_split_or_a_named_one(tmp_path):
    from subtune.cli import eval_records_option
    from subtune.core.errors import DataError
    from subtune.data.loaders import TASKS_DIR, load_records

    if not (TASKS_DIR / "arithmetic" / "dev.json").is_file() and not (TASKS_DIR / "arithmetic" /
                                                                       "validation.json").is_file():
        with pytest.raises(DataError, match="no dev/validation split.*arithmetic:SPLIT"):
            eval_records_option("arithmetic")
    else:
        assert eval_records_option("arithmetic")
    assert eval_records_option("arithmetic:test") == load_records("arithmetic", "test")
    records = load_records("commonsense", "test")[:3]
    assert eval_records_option(str(_jsonl(tmp_path / "e.jsonl", records))) == records


def test_zeroth_order_logs_carry_no_grad_norm(tmp_path):
    run = tmp_path / "mezo"  # a gradient method's logs do carry it: see the Trainer options test above
    result = invoke("train", "--method", "mezo", *QUICK, "--logging-steps", 1, "--save-steps", 2, "--output", run)
    assert result.exit_code == 0, result.output
    steps = [h for h in log_history(run) if "loss" in h]
    assert len(steps) == 2 and not any("grad_norm" in h for h in steps), steps


# ------------------------------------------------------------------------------------------------ method options

def test_method_options_as_extra_flags_or_method_opt_give_the_same_config(tmp_path, trainer_args):
    configs = []
    for opts in (["--d_ratio", "0.05", "--o_ratio", "0.1"], ["--method-opt", "d_ratio=0.05", "--method-opt",
                                                              "o_ratio=0.1"]):
        run = tmp_path / str(len(configs))
        result = invoke("train", "--method", "s2ft", "--max-steps", 1, "--batch-size", 2, "--output", run, *opts)
        assert result.exit_code == 0, result.output
        configs.append(json.loads((run / "adapter" / "adapter_config.json").read_text())["config"])
    assert configs[0] == configs[1] and configs[0]["d_ratio"] == 0.05 and configs[0]["o_ratio"] == 0.1
    args = trainer_args[0].args  # no Trainer option given: the defaults build_trainer always used
    assert (args.warmup_steps, args.lr_scheduler_type.value, args.weight_decay, args.max_grad_norm,
            args.report_to) == (0.03, "linear", 0.0, 1.0, [])
    assert args.eval_strategy.value == "no" and not args.load_best_model_at_end


def test_a_method_field_that_shares_a_trainer_options_name_stays_the_methods():
    from subtune.cli import method_overrides, train

    ctx = click.Context(train)
    assert method_overrides(ctx, "smt", ["--warmup_steps", "3"], ()) == {"warmup_steps": "3"}  # SMT's warm-up


def test_subtune_methods_m_and_train_help_list_the_methods_options():
    from subtune.cli import config_fields

    listed = invoke("methods", "s2ft")
    assert listed.exit_code == 0, listed.output
    lr = subtune.get_method("s2ft").default_lr
    assert f"default --lr {lr:g}" in listed.output
    rows = config_fields(subtune.S2FTConfig)
    assert {r[0] for r in rows} == {"target_modules", "seed", "o_ratio", "v_ratio", "d_ratio", "u_ratio",
                                    "train_gate_with_up", "strategy", "direction", "allocation",
                                    "calibration_batches", "disjoint_from"}
    for name, kind, default, _ in rows:
        line = next(line for line in listed.output.splitlines() if line.split()[:1] == [name])
        assert kind in line and default in line
    assert "the official code never trains Gate" in listed.output  # a field's own comment is its help
    helped = invoke("train", "--method", "s2ft", "--help")
    assert helped.exit_code == 0 and "--warmup-steps" in helped.output
    assert helped.output.index("Method options of s2ft") > helped.output.index("--warmup-steps")
    assert listed.output.strip() in helped.output
    everything = invoke("methods")
    assert all(m in everything.output for m in subtune.available_methods())


# ------------------------------------------------------------------------------------------------------ eval options

def test_eval_dtype_device_and_batch_size_reach_evaluate(monkeypatch):
    import subtune.eval.evaluate as ev

    seen = {}
    real = ev.evaluate

    def spy(model, tokenizer, records, **kwargs):
        seen.update(kwargs, dtype=next(model.parameters()).dtype, device=next(model.parameters()).device.type)
        return real(model, tokenizer, records, **kwargs)

    monkeypatch.setattr(ev, "evaluate", spy)
    result = invoke("eval", "--limit", 3, "--batch-size", 2, "--max-new-tokens", 4, "--dtype", "bf16",
                    "--device", "auto")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert (seen["batch_size"], seen["dtype"], seen["device"]) == (2, torch.bfloat16, device)
    assert (report["dtype"], report["device"], report["total"]) == ("bf16", device, 3)


# -------------------------------------------------------------------------- selection summaries, one-line warnings

def test_train_prints_the_selection_summary_once_and_warnings_as_one_line(tmp_path):
    result = invoke("train", "--method", "s2ft", "--max-steps", 1, "--batch-size", 2, "--output", tmp_path / "r",
                    "--d_ratio", "0.0001")
    assert result.exit_code == 0, result.output
    assert result.output.count("s2ft selected") == 1
    assert "per layer: down_proj [1, 0, 0, 0]" in result.output or "per layer: down_proj [" in result.output
    warning = [line for line in result.stderr.splitlines() if "selects 0 of" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: s2ft: down_proj ratio 0.0001 selects 0 of")
    assert "UserWarning" not in result.stderr and "warnings.warn" not in result.stderr


def _tiny_prepared(config, layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    batches = [{"input_ids": torch.randint(0, 64, (2, 8)), "labels": torch.randint(0, 64, (2, 8))}] * 4
    return subtune.prepare(model, config, calibration=batches)


@pytest.mark.parametrize("config, what", [
    (subtune.S2FTConfig(d_ratio=0.1, o_ratio=0.25), "units"),
    (subtune.SMTConfig(block_size=16, warmup_steps=2), "blocks"),
    (subtune.LaMDAPlusConfig(r=4, rank_min=2, rank_max=8, rank_multiple=2), "ranks"),
], ids=["s2ft", "smt", "lamda++"])
def test_selection_summaries_state_the_selection_per_layer(config, what):
    from subtune.core.api import state_of

    model = _tiny_prepared(config)
    state = state_of(model)
    summary = state.method.selection_summary(model, state)
    assert "\n" not in summary and "per layer:" in summary
    lists = [json.loads(part.split(" ", 1)[1]) for part in summary.split("per layer: ")[1].split("], ")
             for part in [part if part.endswith("]") else part + "]"]]
    assert all(len(row) == 3 for row in lists)  # one entry per decoder layer
    info = state.selection.info
    total = {"units": lambda: sum(info["units"].values()), "blocks": lambda: sum(info["blocks"].values()),
             "ranks": lambda: sum(info["ranks"].values())}[what]()
    assert sum(map(sum, lists)) == total


def test_plain_lamda_states_its_single_rank():
    from subtune.core.api import state_of

    config = subtune.LaMDAConfig(r=4)
    model = _tiny_prepared(config)
    state = state_of(model)
    assert state.method.selection_summary(model, state) == (
        f"lamda: rank 4 in each of the {3 * len(config.target_modules)} target matrices")


# ---------------------------------------------------------------------------------- error hints name the CLI flags

@pytest.fixture(scope="module")
def s2ft_adapter(tmp_path_factory):
    run = tmp_path_factory.mktemp("s2ft") / "run"
    result = invoke("train", "--method", "s2ft", "--max-steps", 2, "--batch-size", 2, "--output", run,
                    "--d_ratio", "0.05", "--lr", "0.01", "--warmup-steps", 0)
    assert result.exit_code == 0, result.output
    return run / "adapter"


def test_export_hints_name_the_cli_flags_and_fallback_svd_exports(s2ft_adapter, tmp_path):
    with pytest.raises(click.ClickException) as info:
        cli("export", "--adapter", s2ft_adapter, "--out", tmp_path / "lora", "--max-rank", 4)
    message = info.value.message
    assert "--max-rank" in message and "--format merged" in message and "--fallback svd" in message
    assert "fallback='svd'" not in message and "subtune.merge" not in message
    result = invoke("export", "--adapter", s2ft_adapter, "--out", tmp_path / "lora", "--max-rank", 4,
                    "--fallback", "svd")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output[result.output.index("{"):])
    assert info["exact"] is False and info["max_rank"] == 4 and 0 < info["max_svd_error"] < 1


def test_full_finetuning_lora_export_hint_names_format_merged(tmp_path):
    run = tmp_path / "full"
    assert invoke("train", "--method", "full", "--max-steps", 1, "--batch-size", 2, "--output", run).exit_code == 0
    with pytest.raises(click.ClickException, match="export a merged model instead \\(--format merged\\)"):
        cli("export", "--adapter", run / "adapter", "--out", tmp_path / "lora")


def test_nonfinite_and_overwrite_hints_name_the_cli_flags(s2ft_adapter, tmp_path):
    from subtune.zoo import load_model

    model, _ = load_model("default")
    subtune.load(model, s2ft_adapter)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(math.nan)
    subtune.save(model, tmp_path / "nan", allow_nonfinite=True)
    with pytest.raises(click.ClickException, match="pass --allow-nonfinite to load it anyway"):
        cli("eval", "--adapter", tmp_path / "nan", "--limit", 1)
    result = invoke("eval", "--adapter", tmp_path / "nan", "--limit", 1, "--max-new-tokens", 2, "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    with pytest.raises(click.ClickException, match="export to another directory or pass --overwrite"):
        cli("export", "--adapter", s2ft_adapter, "--out", s2ft_adapter.parent / "adapter")


# ---------------------------------------------------------------------------------------------- the bad inputs

def _train(tmp, *args):
    return cli("train", "--output", tmp / "run", *args)


CE = click.ClickException
CASES = [
    Case("cli-early-stopping-without-eval-data",
         lambda t: _train(t, "--method", "s2ft", "--early-stopping-patience", 2), CE,
         ("--early-stopping-patience", "--eval-data"), tries="`subtune train --early-stopping-patience 2` without "
         "--eval-data", before="new"),
    Case("cli-eval-steps-without-eval-data", lambda t: _train(t, "--method", "s2ft", "--eval-steps", 5), CE,
         ("--eval-steps", "--eval-data"), tries="`subtune train --eval-steps 5` without --eval-data", before="new"),
    Case("cli-plateau-scheduler-without-eval-data",
         lambda t: _train(t, "--method", "s2ft", "--lr-scheduler", "reduce_lr_on_plateau"), CE,
         ("--lr-scheduler reduce_lr_on_plateau", "--eval-data"),
         tries="`subtune train --lr-scheduler reduce_lr_on_plateau` without an eval set", before="new"),
    Case("cli-early-stopping-saves-off-the-evaluations",
         lambda t: _train(t, "--method", "s2ft", "--eval-data", "arithmetic:test", "--eval-steps", 3,
                          "--save-steps", 4, "--early-stopping-patience", 1), CE,
         ("--save-steps", "multiple of --eval-steps"),
         tries="early stopping with --save-steps not a multiple of --eval-steps", before="new"),
    Case("cli-eval-data-embedded-task-without-dev-split",
         lambda t: _train(t, "--method", "s2ft", "--eval-data", "arithmetic"), CE,
         ("dev/validation split", "arithmetic:SPLIT", "JSON/JSONL file"),
         tries="`--eval-data arithmetic` (no dev split shipped)", before="new"),
    Case("cli-report-to-wandb-not-installed", lambda t: _train(t, "--method", "s2ft", "--report-to", "wandb"), CE,
         ("--report-to wandb", "wandb package is not installed", "--report-to none"),
         tries="`subtune train --report-to wandb` without wandb installed", before="new"),
    Case("cli-report-to-tensorboard-not-installed",
         lambda t: _train(t, "--method", "s2ft", "--report-to", "tensorboard"), CE,
         ("tensorboard package is not installed",), tries="`--report-to tensorboard` without tensorboard",
         before="new"),
    Case("cli-warmup-steps-and-ratio", lambda t: _train(t, "--method", "s2ft", "--warmup-steps", 5,
                                                        "--warmup-ratio", "0.1"), CE,
         ("--warmup-steps and --warmup-ratio", "give one"), tries="both --warmup-steps and --warmup-ratio",
         before="new"),
    Case("cli-warmup-ratio-one", lambda t: _train(t, "--method", "s2ft", "--warmup-ratio", "1"), CE,
         ("0.0<=x<1.0",), tries="`--warmup-ratio 1` (a ratio below 1)", before="new"),
    Case("cli-trainer-option-as-method-key", lambda t: _train(t, "--method", "s2ft", "--warmup_steps", 5), CE,
         ("not a s2ft option", "use --warmup-steps", "d_ratio"),
         tries="`subtune train --method s2ft --warmup_steps 5` (underscore)",
         before="clear: rejected as an unknown s2ft key, no hint of --warmup-steps"),
    Case("cli-hf-learning-rate-as-method-key", lambda t: _train(t, "--method", "lora", "--learning_rate", "1e-3"), CE,
         ("not a lora option", "use --lr", "lora_alpha"), tries="`--learning_rate 1e-3` (the Trainer's name)",
         before="clear: rejected as an unknown lora key"),
    Case("cli-method-opt-without-equals", lambda t: _train(t, "--method", "s2ft", "--method-opt", "d_ratio"), CE,
         ("key=value", "--method-opt d_ratio=0.05"), tries="`--method-opt d_ratio` (no =value)", before="new"),
    Case("cli-method-opt-twice", lambda t: _train(t, "--method", "s2ft", "--d_ratio", "0.1", "--method-opt",
                                                  "d_ratio=0.2"), CE,
         ("d_ratio is given twice",), tries="a method field as --d_ratio and --method-opt", before="new"),
    Case("cli-eval-device-cuda-without-cuda", lambda t: cli("eval", "--device", "cuda", "--limit", 1), CE,
         ("no cuda device", "--device cpu"), tries="`subtune eval --device cuda` with no CUDA device", before="new"),
    Case("cli-export-fallback-with-merged",
         lambda t: cli("export", "--adapter", t, "--out", t / "m", "--format", "merged", "--fallback", "svd"), CE,
         ("--fallback is for --format lora",), tries="`subtune export --format merged --fallback svd`",
         before="new"),
    Case("cli-methods-unknown", lambda t: cli("methods", "nope"), CE, ("unknown method 'nope'", "s2ft"),
         tries="`subtune methods nope`", before="new"),
]
if torch.cuda.is_available():  # the cuda row needs a machine without CUDA
    CASES = [c for c in CASES if c.id != "cli-eval-device-cuda-without-cuda"]


@cases_param(CASES)
def test_catalogue_cli_options(case, tmp_path):
    check_case(case, tmp_path)
