"""The bad-input catalogue for configs, data, evaluation and the CLI (rows of docs/RELIABILITY.md).

Each row is one bad input: it must raise the named subtune error, with a message that names the problem and the fix,
and leave every file under tmp_path as it was. CLI rows run the real command through click's CliRunner and count only
a clean failure: a non-zero exit, exactly one `Error:` line, no traceback (a raw exception fails the row).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing

import pytest
import torch
from click.testing import CliRunner

from conftest import CharTokenizer, make_tiny
from reliability import Case, cases_param, check_case

import subtune
from subtune.cli import main
from subtune.core.config import ConfigError
from subtune.core.errors import DataError, ModelLayoutError, ModelNotFoundError, SubtuneError, UnknownMethodError
from subtune.data.loaders import calibration_batches, encode_choice_record, load_records
from subtune.eval.evaluate import EvalResult, evaluate, perplexity, report
from subtune.recipes import make_config, read_config_file
from subtune.zoo import load_model

NAN, INF = float("nan"), float("inf")
RECORD = {"instruction": "add 2 and 3", "input": "", "output": "5", "answer": "5"}


class CliError(Exception):
    """A CLI command that failed cleanly; the message is its one `Error:` line."""


def cli(*args):
    """A row runner: invoke `subtune ARGS` ('{tmp}' in an argument becomes the row's tmp_path)."""
    def run(tmp):
        argv = [str(a).format(tmp=tmp) for a in args]
        result = CliRunner().invoke(main, argv)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception  # a traceback for the user: the row fails on the wrong error type
        assert result.exit_code != 0, f"subtune {' '.join(argv)} succeeded:\n{result.output}"
        assert "Traceback" not in result.output, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, f"expected one 'Error:' line, got:\n{result.output}"
        raise CliError(errors[0])
    return run


def files(contents: dict[str, str | bytes]):
    """A setup that writes {name: content} into tmp_path; the row must leave them untouched."""
    def setup(tmp):
        for name, content in contents.items():
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def batch():
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def prepare(config, calibration=None):
    return lambda tmp: subtune.prepare(make_tiny(0), config(), calibration=calibration)


LATIN1 = b'[\n {"instruction": "caf\xe9", "input": "", "output": "x", "answer": "x"}\n]\n'

CONFIG_CASES = [
    # generic: every float finite, every field its annotated type (also for direct construction)
    Case("lora-nan-alpha", lambda tmp: subtune.LoraConfig(lora_alpha=NAN), ConfigError, ("lora_alpha", "finite")),
    Case("lora-inf-alpha-override", lambda tmp: subtune.LoraConfig().with_overrides({"lora_alpha": "inf"}),
         ConfigError, ("lora_alpha", "finite")),
    Case("lora-string-rank", lambda tmp: subtune.LoraConfig(r="8"), ConfigError, ("r must be an int", "str '8'")),
    Case("lora-bool-rank", lambda tmp: subtune.LoraConfig.from_dict({"r": True}), ConfigError, ("r: expected int",)),
    Case("lora-fractional-rank", lambda tmp: subtune.LoraConfig().with_overrides({"r": "8.5"}), ConfigError,
         ("r: expected int",)),
    Case("lora-word-rank", lambda tmp: subtune.LoraConfig().with_overrides({"r": "eight"}), ConfigError,
         ("r: expected int",)),
    Case("lora-target-modules-string", lambda tmp: subtune.LoraConfig(target_modules="q_proj"), ConfigError,
         ("target_modules", "a list of str")),
    Case("config-list-field-number", lambda tmp: subtune.LoraConfig.from_dict({"target_modules": 5}), ConfigError,
         ("target_modules", "a list of str")),
    Case("config-negative-seed", lambda tmp: subtune.LoraConfig(seed=-1), ConfigError, ("seed", "[0, 4294967295]")),
    Case("config-huge-seed", lambda tmp: subtune.S2FTConfig(seed=2**40), ConfigError, ("seed", "[0, 4294967295]")),
    Case("config-unknown-key", lambda tmp: subtune.config_from_dict({"method": "lora", "rank": 8}), ConfigError,
         ("unknown config key(s) ['rank']", "'r'")),
    Case("config-other-method", lambda tmp: subtune.LoraConfig.from_dict({"method": "s2ft"}), ConfigError,
         ("for method 's2ft', not 'lora'",)),
    Case("config-without-method", lambda tmp: subtune.config_from_dict({"r": 8}), ConfigError,
         ("'method' key", "lora")),
    Case("config-not-a-mapping", lambda tmp: subtune.LoraConfig.from_dict([("r", 8)]), ConfigError,
         ("mapping", "list")),
    Case("unknown-method", lambda tmp: subtune.get_method("nope"), UnknownMethodError,
         ("unknown method 'nope'", "available methods", "lora")),
    Case("unknown-method-unhashable", lambda tmp: subtune.get_method(["lora"]), UnknownMethodError,
         ("unknown method", "available methods")),
    # LoRA / DoRA
    Case("lora-rank-zero", lambda tmp: subtune.LoraConfig().with_overrides({"r": "0"}), ConfigError,
         ("r must be >= 1",)),
    Case("lora-zero-alpha", lambda tmp: subtune.LoraConfig(lora_alpha=0), ConfigError, ("lora_alpha", "> 0")),
    Case("lora-dropout-one", lambda tmp: subtune.LoraConfig(lora_dropout=1.0), ConfigError,
         ("lora_dropout", "[0, 1)")),
    Case("lora-no-targets", lambda tmp: subtune.LoraConfig(target_modules=[]), ConfigError,
         ("target_modules is empty", "q_proj")),
    Case("lora-rank-above-layer", prepare(lambda: subtune.LoraConfig(r=100000)), ConfigError,
         ("r=100000", "largest valid rank for these targets is 16")),
    Case("dora-rank-above-layer", prepare(lambda: subtune.DoraConfig(r=17)), ConfigError,
         ("r=17", "set r <= 16")),
    Case("lora-target-matches-nothing", prepare(lambda: subtune.LoraConfig(target_modules=["query"])),
         ModelLayoutError, ("['query'] match no linear layer", "q_proj")),
    # S2FT
    Case("s2ft-nan-ratio", lambda tmp: subtune.S2FTConfig(d_ratio=NAN), ConfigError, ("d_ratio", "finite")),
    Case("s2ft-ratio-above-one", lambda tmp: subtune.S2FTConfig(d_ratio=1.5), ConfigError, ("d_ratio", "[0, 1]")),
    Case("s2ft-ratio-for-untargeted", lambda tmp: subtune.S2FTConfig(target_modules=["o_proj"], d_ratio=0.1),
         ConfigError, ("d_ratio=0.1", "down_proj is not in target_modules")),
    Case("s2ft-unknown-target", lambda tmp: subtune.S2FTConfig(target_modules=["q_proj"]), ConfigError,
         ("remove ['q_proj']",)),
    Case("s2ft-unknown-strategy", lambda tmp: subtune.S2FTConfig(strategy="best"), ConfigError,
         ("strategy 'best'", "random")),
    Case("s2ft-bad-direction", lambda tmp: subtune.S2FTConfig(direction="up"), ConfigError,
         ("direction", "['large', 'small']")),
    Case("s2ft-bad-allocation-override", lambda tmp: subtune.S2FTConfig().with_overrides({"allocation": "layer"}),
         ConfigError, ("allocation", "'layer' is not one of")),
    Case("s2ft-all-ratios-zero", lambda tmp: subtune.S2FTConfig(o_ratio=0.0, d_ratio=0.0), ConfigError,
         ("every ratio is 0", "d_ratio=0.03")),
    Case("s2ft-targets-select-nothing", prepare(lambda: subtune.S2FTConfig(target_modules=["v_proj"])), ConfigError,
         ("nothing would train", "d_ratio")),
    Case("s2ft-calibration-batches-zero", lambda tmp: subtune.S2FTConfig(calibration_batches=0), ConfigError,
         ("calibration_batches", ">= 1")),
    Case("s2ft-gradient-without-calibration", prepare(lambda: subtune.S2FTConfig(d_ratio=0.1, strategy="gradient")),
         SubtuneError, ("calibration=",)),
    # SMT
    Case("smt-block-size-zero", lambda tmp: subtune.SMTConfig(block_size=0), ConfigError, ("block_size", ">= 1")),
    Case("smt-block-larger-than-matrices",
         prepare(lambda: subtune.SMTConfig(block_size=100000, num_blocks=1, warmup_steps=1), [batch()]),
         ConfigError, ("block_size=100000", "larger than every targeted matrix", "block_size <= 32")),
    Case("smt-zero-ratio", lambda tmp: subtune.SMTConfig(ratio=0.0), ConfigError, ("zero blocks", "ratio > 0")),
    Case("smt-zero-num-blocks", lambda tmp: subtune.SMTConfig(num_blocks=0), ConfigError,
         ("zero blocks", "num_blocks >= 1")),
    Case("smt-more-blocks-than-exist",
         prepare(lambda: subtune.SMTConfig(block_size=8, num_blocks=10**6, warmup_steps=1), [batch()]),
         ConfigError, ("num_blocks=1000000", "num_blocks <= 64")),
    Case("smt-nan-ratio", lambda tmp: subtune.SMTConfig(ratio=NAN), ConfigError, ("ratio", "finite")),
    Case("smt-mlp-ratio-above-one", lambda tmp: subtune.SMTConfig(mlp_ratio=2.0), ConfigError,
         ("mlp_ratio", "[0, 1]")),
    Case("smt-negative-warmup-lr", lambda tmp: subtune.SMTConfig(warmup_lr=-1e-5), ConfigError,
         ("warmup_lr", "> 0")),
    Case("smt-warmup-steps-zero", lambda tmp: subtune.SMTConfig(warmup_steps=0), ConfigError,
         ("warmup_steps", ">= 1")),
    Case("smt-unknown-score", lambda tmp: subtune.SMTConfig(score="max"), ConfigError, ("score 'max'", "abs_of_mean")),
    Case("smt-attention-in-mlp-modules", lambda tmp: subtune.SMTConfig(mlp_modules=["q_proj"]), ConfigError,
         ("mlp_modules", "not ['q_proj']")),
    Case("smt-empty-calibration", prepare(lambda: subtune.SMTConfig(block_size=8, num_blocks=2, warmup_steps=1), []),
         DataError, ("gave no batch", "warm-up batches")),
    Case("smt-without-calibration", prepare(lambda: subtune.SMTConfig(block_size=8, num_blocks=2)), SubtuneError,
         ("calibration=",)),
    # LaMDA / LaMDA++
    Case("lamda-rank-above-layer", prepare(lambda: subtune.LaMDAConfig(r=40)), ConfigError,
         ("r=40", "exceeds min(out, in)", "largest valid rank for these targets is 16")),
    Case("lamda-zero-alpha", lambda tmp: subtune.LaMDAConfig(lora_alpha=0.0), ConfigError, ("lora_alpha", "> 0")),
    Case("lamda-unknown-init", lambda tmp: subtune.LaMDAConfig(init="random"), ConfigError,
         ("init 'random'", "svd_zero")),
    Case("lamda-freeze-fraction-above-one", lambda tmp: subtune.LaMDAConfig(freeze_fraction=1.5), ConfigError,
         ("freeze_fraction", "[0, 1]")),
    Case("lamda-nan-freeze-fraction", lambda tmp: subtune.LaMDAConfig(freeze_fraction=NAN), ConfigError,
         ("freeze_fraction", "finite")),
    Case("lamda-negative-freeze-steps", lambda tmp: subtune.LaMDAConfig(freeze_steps=-1), ConfigError,
         ("freeze_steps", ">= 0")),
    Case("lamda-bad-freeze-order", lambda tmp: subtune.LaMDAConfig(freeze_order="random"), ConfigError,
         ("freeze_order", "largest_first")),
    Case("lamdapp-rank-bounds", lambda tmp: subtune.LaMDAPlusConfig(rank_min=16, rank_max=8), ConfigError,
         ("rank_multiple <= rank_min <= rank_max", "rank_max=8")),
    Case("lamdapp-rank-not-multiple", lambda tmp: subtune.LaMDAPlusConfig(rank_min=12), ConfigError,
         ("multiples of rank_multiple",)),
    Case("lamdapp-r-below-rank-min", lambda tmp: subtune.LaMDAPlusConfig(r=4), ConfigError,
         ("r=4", "rank_min=8", "r >= rank_min")),
    # full, and the generic checks on the zeroth-order configs
    Case("full-string-flag", lambda tmp: subtune.FullConfig(train_embeddings="no"), ConfigError,
         ("train_embeddings", "a bool")),
    Case("full-bad-flag-override", lambda tmp: subtune.FullConfig().with_overrides({"train_embeddings": "maybe"}),
         ConfigError, ("train_embeddings: expected true/false",)),
    Case("senszo-nan-eps", lambda tmp: subtune.SensZOConfig(eps=NAN), ConfigError, ("eps", "finite")),
    Case("mezo-inf-eps-override", lambda tmp: subtune.MeZOConfig().with_overrides({"eps": "inf"}), ConfigError,
         ("eps", "finite")),
    Case("mezo-fractional-directions", lambda tmp: subtune.MeZOConfig(directions=1.5), ConfigError,
         ("directions", "an int")),
    Case("mezo-bad-objective", lambda tmp: subtune.MeZOConfig(objective="mse"), ConfigError,
         ("objective", "['lm', 'choice']")),
]

DATA_CASES = [
    Case("data-non-utf8", lambda tmp: load_records(tmp / "latin.json"), DataError,
         ("latin.json", "line 2", "byte", "utf-8")),
    Case("data-missing-file", lambda tmp: load_records(tmp / "missing.json"), DataError,
         ("neither an embedded task", "arithmetic")),
    Case("data-directory", lambda tmp: load_records(tmp), DataError, ("is a directory", ".jsonl file")),
    Case("data-missing-split", lambda tmp: load_records("arithmetic", "validation"), DataError,
         ("no split 'validation'", "['test', 'train']")),
    Case("data-malformed-record", lambda tmp: load_records(tmp / "bad.json"), DataError,
         ("bad.json, line 3", "['output']", "llm-adapters")),
    Case("data-invalid-jsonl", lambda tmp: load_records(tmp / "bad.jsonl"), DataError,
         ("bad.jsonl: line 2", "invalid json")),
    Case("data-invalid-json-list", lambda tmp: load_records(tmp / "list.json"), DataError,
         ("list.json: line 2", "invalid json")),
    Case("data-unterminated-list", lambda tmp: load_records(tmp / "open.json"), DataError,
         ("open.json", "unterminated")),
    Case("data-empty", lambda tmp: load_records(tmp / "empty.json"), DataError, ("no records", "instruction")),
    Case("data-record-not-object", lambda tmp: load_records(tmp / "strings.json"), DataError,
         ("line 1", "expected an object", "str")),
    Case("data-input-not-string", lambda tmp: load_records(tmp / "input.jsonl"), DataError,
         ("line 1", "'input' must be a string")),
    Case("data-missing-answer", lambda tmp: load_records(tmp / "noanswer.jsonl", need_answer=True), DataError,
         ("line 1", "['answer']")),
    Case("data-choices-not-list", lambda tmp: load_records(tmp / "choices.jsonl"), DataError,
         ("line 1", "'choices' must be a list of strings")),
    Case("data-choice-objective-without-choices", lambda tmp: encode_choice_record(CharTokenizer(), RECORD),
         DataError, ("choices", "answer")),
    Case("calibration-no-records", lambda tmp: calibration_batches(CharTokenizer(), []), DataError,
         ("at least one record",)),
    Case("calibration-zero-batch-size", lambda tmp: calibration_batches(CharTokenizer(), [RECORD], batch_size=0),
         ConfigError, ("batch_size", ">= 1")),
    Case("config-file-broken-yaml", lambda tmp: read_config_file(tmp / "bad.yaml"), ConfigError,
         ("bad.yaml", "line 3", "invalid yaml")),
    Case("config-file-missing", lambda tmp: read_config_file(tmp / "none.yaml"), ConfigError,
         ("none.yaml does not exist", "yaml or json file")),
    Case("config-file-not-mapping", lambda tmp: read_config_file(tmp / "list.yaml"), ConfigError,
         ("list.yaml", "mapping")),
    Case("config-file-non-utf8", lambda tmp: read_config_file(tmp / "latin.yaml"), ConfigError,
         ("latin.yaml", "utf-8")),
    Case("config-file-number-keys", lambda tmp: read_config_file(tmp / "keys.yaml"), ConfigError,
         ("keys.yaml", "keys must be field names")),
    Case("config-file-other-method", lambda tmp: make_config("s2ft", {"method": "lora", "r": 8}), ConfigError,
         ("method 'lora'", "'s2ft'", "make them agree")),
    Case("config-file-nan", lambda tmp: make_config("lora", read_config_file(tmp / "nan.yaml")), ConfigError,
         ("lora_alpha", "finite")),
    Case("model-not-found", lambda tmp: load_model(str(tmp / "nowhere")), ModelNotFoundError,
         ("not 'default' or a local hf model directory", "never downloads")),
    Case("model-bad-dtype", lambda tmp: load_model("default", "fp8"), ConfigError,
         ("dtype 'fp8'", "bf16")),
    Case("eval-no-records", lambda tmp: evaluate(make_tiny(0), CharTokenizer(), []), DataError,
         ("empty", "--limit")),
    Case("eval-zero-batch-size", lambda tmp: evaluate(make_tiny(0), CharTokenizer(), [RECORD], batch_size=0),
         ConfigError, ("batch_size", ">= 1")),
    Case("eval-zero-new-tokens", lambda tmp: evaluate(make_tiny(0), CharTokenizer(), [RECORD], max_new_tokens=0),
         ConfigError, ("max_new_tokens", ">= 1")),
    Case("perplexity-no-records", lambda tmp: perplexity(make_tiny(0), CharTokenizer(), []), DataError,
         ("empty",)),
]
_DATA_FILES = files({
    "latin.json": LATIN1,
    "bad.json": '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c"}\n]\n',
    "bad.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": \n',
    "list.json": '[\n {"instruction": }\n]\n',
    "open.json": '[{"instruction": "a", "output": "b"}',
    "empty.json": "[]",
    "strings.json": '["a", "b"]',
    "input.jsonl": json.dumps({"instruction": "a", "input": 5, "output": "b"}) + "\n",
    "noanswer.jsonl": json.dumps({"instruction": "a", "output": "b"}) + "\n",
    "choices.jsonl": json.dumps({**RECORD, "choices": "abc"}) + "\n",
    "bad.yaml": "r: 8\nlora_alpha: [1, 2\n",
    "list.yaml": "- r\n- 8\n",
    "latin.yaml": b"r: 8\n# caf\xe9\n",
    "keys.yaml": "1: 2\n",
    "nan.yaml": "lora_alpha: .nan\n",
})
DATA_CASES = [dataclasses.replace(c, setup=_DATA_FILES) for c in DATA_CASES]

CLI_CASES = [
    # train: only what goes through the config/data/error-display code (engineer B's rows cover the train flags)
    Case("cli-train-unknown-method", cli("train", "--method", "nope", "--output", "{tmp}/run"), CliError,
         ("unknown method 'nope'", "subtune methods")),
    Case("cli-train-unknown-key", cli("train", "--method", "lora", "--rank", "8", "--output", "{tmp}/run"), CliError,
         ("unknown config key(s) ['rank']", "'r'")),
    Case("cli-train-missing-data", cli("train", "--method", "lora", "--data", "{tmp}/missing.json", "--output",
                                       "{tmp}/run"), CliError, ("neither an embedded task",)),
    Case("cli-train-non-utf8-data", cli("train", "--method", "lora", "--data", "{tmp}/latin.json", "--output",
                                        "{tmp}/run"), CliError, ("latin.json, line 2", "utf-8")),
    Case("cli-train-missing-model", cli("train", "--method", "lora", "--model", "{tmp}/nowhere", "--output",
                                        "{tmp}/run"), CliError, ("not 'default' or a local hf model directory",)),
    Case("cli-train-broken-yaml", cli("train", "--method", "lora", "--config", "{tmp}/bad.yaml", "--output",
                                      "{tmp}/run"), CliError, ("bad.yaml, line 3", "invalid yaml")),
    Case("cli-train-config-other-method", cli("train", "--method", "s2ft", "--config", "{tmp}/lora.yaml",
                                              "--output", "{tmp}/run"), CliError, ("'lora'", "make them agree")),
    Case("cli-train-nan-override", cli("train", "--method", "lora", "--lora_alpha", "nan", "--output", "{tmp}/run"),
         CliError, ("lora_alpha", "finite")),
    Case("cli-train-string-rank", cli("train", "--method", "lora", "--r", "8.5", "--output", "{tmp}/run"), CliError,
         ("r: expected int",)),
    Case("cli-train-duplicate-override", cli("train", "--method", "lora", "--r", "8", "--r", "4", "--output",
                                             "{tmp}/run"), CliError, ("--r is given twice", "give it once")),
    Case("cli-train-stray-argument", cli("train", "--method", "lora", "stray", "--output", "{tmp}/run"), CliError,
         ("unexpected argument 'stray'", "--key value")),
    # eval
    Case("cli-eval-missing-adapter", cli("eval", "--adapter", "{tmp}/nowhere"), CliError,
         ("nowhere", "does not exist")),
    Case("cli-eval-limit-zero", cli("eval", "--limit", "0"), CliError, ("--limit", "x>=1")),
    Case("cli-eval-limit-negative", cli("eval", "--limit", "-5"), CliError, ("--limit", "x>=1")),
    Case("cli-eval-batch-size-zero", cli("eval", "--batch-size", "0"), CliError, ("--batch-size", "x>=1")),
    Case("cli-eval-max-new-tokens-zero", cli("eval", "--max-new-tokens", "0"), CliError,
         ("--max-new-tokens", "x>=1")),
    Case("cli-eval-missing-split", cli("eval", "--split", "dev"), CliError, ("no split 'dev'", "['test', 'train']")),
    Case("cli-eval-non-utf8-task", cli("eval", "--task", "{tmp}/latin.json"), CliError, ("line 2", "utf-8")),
    Case("cli-eval-predictions-unwritable", cli("eval", "--predictions", "{tmp}/afile/p.json"), CliError,
         ("--predictions", "is a file, not a directory", "another path")),
    # export
    Case("cli-export-max-rank-zero", cli("export", "--adapter", "{tmp}/nowhere", "--out", "{tmp}/o", "--max-rank",
                                         "0"), CliError, ("--max-rank", "x>=1")),
    Case("cli-export-max-rank-negative", cli("export", "--adapter", "{tmp}/nowhere", "--out", "{tmp}/o",
                                             "--max-rank", "-3"), CliError, ("--max-rank", "x>=1")),
    Case("cli-export-missing-adapter", cli("export", "--adapter", "{tmp}/nowhere", "--out", "{tmp}/o"), CliError,
         ("nowhere", "does not exist")),
    Case("cli-export-out-unwritable", cli("export", "--adapter", "{tmp}/nowhere", "--out", "{tmp}/afile/lora"),
         CliError, ("--out", "is a file, not a directory")),
    # bench
    Case("cli-bench-unknown-method", cli("bench", "--methods", "lora,nope", "--out", "{tmp}/b"), CliError,
         ("unknown method 'nope'", "available methods")),
    Case("cli-bench-no-methods", cli("bench", "--methods", ",", "--out", "{tmp}/b"), CliError,
         ("--methods", "name at least one")),
    Case("cli-bench-unknown-preset", cli("bench", "--preset", "7b", "--budget", "1000", "--out", "{tmp}/b"),
         CliError, ("preset '7b'", "llama2-7b")),
    Case("cli-bench-batch-zero", cli("bench", "--batch", "0"), CliError, ("--batch", "x>=1")),
    Case("cli-bench-steps-zero", cli("bench", "--steps", "0"), CliError, ("--steps", "x>=1")),
    Case("cli-bench-negative-warmup", cli("bench", "--warmup", "-1"), CliError, ("--warmup", "x>=0")),
    Case("cli-bench-budget-zero", cli("bench", "--budget", "0"), CliError, ("--budget", "x>=1")),
    Case("cli-bench-out-unwritable", cli("bench", "--preset", "tiny", "--out", "{tmp}/afile/b"), CliError,
         ("--out", "is a file, not a directory")),
    # senszo-mask
    Case("cli-senszo-mask-density-zero", cli("senszo-mask", "--out", "{tmp}/m.safetensors", "--density", "0"),
         CliError, ("--density", "0.0<x<=1.0")),
    Case("cli-senszo-mask-density-nan", cli("senszo-mask", "--out", "{tmp}/m.safetensors", "--density", "nan"),
         CliError, ("--density", "not a finite number")),
    Case("cli-senszo-mask-samples-zero", cli("senszo-mask", "--out", "{tmp}/m.safetensors", "--samples", "0"),
         CliError, ("--samples", "x>=1")),
    Case("cli-senszo-mask-seq-one", cli("senszo-mask", "--out", "{tmp}/m.safetensors", "--seq", "1"), CliError,
         ("--seq", "x>=2")),
    Case("cli-senszo-mask-out-unwritable", cli("senszo-mask", "--out", "{tmp}/afile/m.safetensors"), CliError,
         ("--out", "is a file, not a directory")),
    Case("cli-senszo-mask-non-utf8-data", cli("senszo-mask", "--out", "{tmp}/m.safetensors", "--data",
                                              "{tmp}/latin.json"), CliError, ("latin.json, line 2", "utf-8")),
    # demo
    Case("cli-demo-steps-zero", cli("demo", "--steps", "0", "--output", "{tmp}/demo"), CliError, ("--steps", "x>=1")),
    Case("cli-demo-limit-zero", cli("demo", "--limit", "0", "--output", "{tmp}/demo"), CliError, ("--limit", "x>=1")),
    Case("cli-demo-unknown-method", cli("demo", "--methods", "lora,nope", "--output", "{tmp}/demo"), CliError,
         ("unknown method 'nope'", "available methods")),
    Case("cli-demo-missing-task", cli("demo", "--task", "{tmp}/missing.json", "--output", "{tmp}/demo"), CliError,
         ("neither an embedded task",)),
]
_CLI_FILES = files({"latin.json": LATIN1, "bad.yaml": "r: 8\nlora_alpha: [1, 2\n", "lora.yaml": "method: lora\nr: 8\n",
                    "afile": "not a directory\n"})
CLI_CASES = [dataclasses.replace(c, setup=_CLI_FILES) for c in CLI_CASES]


@cases_param(CONFIG_CASES)
def test_catalogue_configs(case, tmp_path):
    check_case(case, tmp_path)


@cases_param(DATA_CASES)
def test_catalogue_data_and_eval(case, tmp_path):
    check_case(case, tmp_path)


@cases_param(CLI_CASES)
def test_catalogue_cli(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that wrote relative paths would show up in the snapshot
    check_case(case, tmp_path)


def test_catalogue_ids_are_unique():
    ids = [c.id for c in CONFIG_CASES + DATA_CASES + CLI_CASES]
    assert len(ids) == len(set(ids))


# --- the generic config checks, over every field of every registered config --------------------------------------

def _fields(kind):
    out = []
    for method_id in subtune.available_methods():
        cls = subtune.get_method(method_id).config_class
        hints = typing.get_type_hints(cls)
        out += [(method_id, f.name) for f in dataclasses.fields(cls)
                if hints[f.name] is kind or (typing.get_origin(hints[f.name]) in (typing.Union, types.UnionType)
                                             and kind in typing.get_args(hints[f.name]))]
    return out


@pytest.mark.parametrize("method_id, name", _fields(float))
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_every_float_field_refuses_non_finite_values(method_id, name, bad):
    cls = subtune.get_method(method_id).config_class
    with pytest.raises(ConfigError, match=rf"{name} must be a finite number"):
        cls(**{name: bad})
    with pytest.raises(ConfigError, match=rf"{name} must be a finite number"):
        cls().with_overrides({name: str(bad)})


@pytest.mark.parametrize("method_id, name", _fields(int))
def test_every_int_field_refuses_strings_bools_and_fractions(method_id, name):
    cls = subtune.get_method(method_id).config_class
    for bad in ("8", True, 2.5):
        with pytest.raises(ConfigError, match=rf"{name} must be (an int|an int or None), got"):
            cls(**{name: bad})


@pytest.mark.parametrize("method_id", subtune.available_methods())
def test_valid_configs_are_normalised_and_still_accepted(method_id):
    cls = subtune.get_method(method_id).config_class
    config = cls(target_modules=tuple(cls().target_modules))
    assert config.target_modules == cls().target_modules and isinstance(config.target_modules, list)
    for f in dataclasses.fields(cls):
        if typing.get_type_hints(cls)[f.name] is float:  # an int in a float field is stored as a float
            value = getattr(cls(), f.name)
            again = cls(**{f.name: int(value) if float(value).is_integer() else value})
            assert type(getattr(again, f.name)) is float
    assert subtune.config_from_dict(json.loads(config.to_json())) == config


def test_numpy_numbers_and_paths_become_plain_values(tmp_path):
    import numpy as np

    config = subtune.LoraConfig(r=np.int64(8), lora_alpha=np.float32(16), seed=np.int32(3))
    assert (type(config.r), type(config.lora_alpha), type(config.seed)) == (int, float, int)
    assert subtune.SensZOConfig(mask_path=tmp_path / "m.safetensors").mask_path == str(tmp_path / "m.safetensors")
    json.loads(config.to_json())


def test_every_demo_setting_is_a_valid_config():
    from subtune.recipes import DEMO_METHODS

    for method_id, settings in DEMO_METHODS.items():
        assert make_config(method_id, settings.get("config")).method == method_id


def test_config_error_is_a_subtune_value_error():
    assert issubclass(ConfigError, SubtuneError) and issubclass(ConfigError, ValueError)
    assert issubclass(UnknownMethodError, KeyError) and issubclass(ModelNotFoundError, FileNotFoundError)
    assert str(UnknownMethodError("unknown method 'x'")) == "unknown method 'x'"  # no KeyError quotes


# --- limits that need the model: the largest valid values are accepted --------------------------------------------

def test_the_largest_valid_rank_is_accepted():
    model = subtune.prepare(make_tiny(0), subtune.LoraConfig(r=16))  # k_proj is 16x32
    assert subtune.trainable_summary(model).trainable > 0
    subtune.prepare(make_tiny(0), subtune.LaMDAConfig(r=16))


def test_smt_ratio_beyond_the_candidate_blocks_warns_and_takes_them_all():
    with pytest.warns(UserWarning, match="hold only 64"):
        model = subtune.prepare(make_tiny(0), subtune.SMTConfig(block_size=8, ratio=1.0, warmup_steps=1),
                                calibration=[batch()])
    assert sum(model.subtune_state.selection.info["blocks"].values()) == 64


def test_a_bom_at_the_start_of_a_data_file_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([RECORD]).encode())
    assert load_records(path) == [RECORD]


# --- evaluation: never a fake number, always valid JSON ------------------------------------------------------------

def test_overflowing_perplexity_is_inf_and_reported_as_null():
    model = make_tiny(0)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)  # losses in the thousands: exp() overflows a float
    ppl = perplexity(model, CharTokenizer(), [RECORD])
    assert ppl == INF
    with pytest.warns(UserWarning, match="reported as null"):
        summary = report(EvalResult(accuracy=0.5, correct=1, total=2, perplexity=ppl))
    assert summary["perplexity"] is None
    json.dumps(summary, allow_nan=False)


def test_a_normal_perplexity_is_reported_unchanged():
    ppl = perplexity(make_tiny(0), CharTokenizer(), [RECORD])
    assert 1.0 < ppl < 1e4
    assert report(EvalResult(accuracy=1.0, correct=1, total=1, perplexity=ppl))["perplexity"] == round(ppl, 4)


def test_eval_prints_valid_json_when_the_perplexity_is_nan(monkeypatch):
    import subtune.eval.evaluate as ev

    monkeypatch.setattr(ev, "evaluate", lambda model, tok, records, **kw: EvalResult(0.0, 0, len(records), NAN))
    with pytest.warns(UserWarning, match="reported as null"):
        result = CliRunner().invoke(main, ["eval", "--limit", "2"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    summary = json.loads(out[out.index("{"):], parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert summary["perplexity"] is None and summary["total"] == 2


def test_cli_real_bugs_keep_their_traceback(monkeypatch):
    """Only subtune's own errors become one line; a KeyError from a bug must not be hidden as a clean message."""
    import subtune.data.loaders as loaders

    def buggy(*args, **kwargs):
        raise KeyError("internal")
    monkeypatch.setattr(loaders, "load_records", buggy)
    result = CliRunner().invoke(main, ["eval", "--limit", "1"])
    assert isinstance(result.exception, KeyError)
    assert "Error:" not in result.output
