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
    Case("lora-nan-alpha", lambda tmp: subtune.LoraConfig(lora_alpha=NAN), ConfigError, ("lora_alpha", "finite"),
         tries="`LoraConfig(lora_alpha=nan)`", before="silent"),
    Case("lora-inf-alpha-override", lambda tmp: subtune.LoraConfig().with_overrides({"lora_alpha": "inf"}),
         ConfigError, ("lora_alpha", "finite"), tries="`--lora_alpha inf` as an override", before="silent"),
    Case("lora-string-rank", lambda tmp: subtune.LoraConfig(r="8"), ConfigError, ("r must be an int", "str '8'"),
         tries="`LoraConfig(r='8')`", before="raw"),
    Case("lora-bool-rank", lambda tmp: subtune.LoraConfig.from_dict({"r": True}), ConfigError, ("r: expected int",),
         tries="`r: true` in a config dict", before="silent: became r=1"),
    Case("lora-fractional-rank", lambda tmp: subtune.LoraConfig().with_overrides({"r": "8.5"}), ConfigError,
         ("r: expected int",), tries="`--r 8.5`", before="clear"),
    Case("lora-word-rank", lambda tmp: subtune.LoraConfig().with_overrides({"r": "eight"}), ConfigError,
         ("r: expected int",), tries="`--r eight`", before="clear"),
    Case("lora-target-modules-string", lambda tmp: subtune.LoraConfig(target_modules="q_proj"), ConfigError,
         ("target_modules", "a list of str"),
         tries="`LoraConfig(target_modules='q_proj')`", before="raw: matched single characters"),
    Case("config-list-field-number", lambda tmp: subtune.LoraConfig.from_dict({"target_modules": 5}), ConfigError,
         ("target_modules", "a list of str"), tries="`target_modules: 5`", before="raw"),
    Case("config-negative-seed", lambda tmp: subtune.LoraConfig(seed=-1), ConfigError, ("seed", "[0, 4294967295]"),
         tries="`LoraConfig(seed=-1)`", before="raw"),
    Case("config-huge-seed", lambda tmp: subtune.S2FTConfig(seed=2**40), ConfigError, ("seed", "[0, 4294967295]"),
         tries="`S2FTConfig(seed=2**40)`", before="raw: a numpy seed error during training"),
    Case("config-unknown-key", lambda tmp: subtune.config_from_dict({"method": "lora", "rank": 8}), ConfigError,
         ("unknown config key(s) ['rank']", "'r'"), tries="`{'method': 'lora', 'rank': 8}`", before="clear"),
    Case("config-other-method", lambda tmp: subtune.LoraConfig.from_dict({"method": "s2ft"}), ConfigError,
         ("for method 's2ft', not 'lora'",), tries="`LoraConfig.from_dict({'method': 's2ft'})`", before="clear"),
    Case("config-without-method", lambda tmp: subtune.config_from_dict({"r": 8}), ConfigError,
         ("'method' key", "lora"), tries="`config_from_dict({'r': 8})`", before="raw: a bare KeyError"),
    Case("config-not-a-mapping", lambda tmp: subtune.LoraConfig.from_dict([("r", 8)]), ConfigError,
         ("mapping", "list"), tries="`LoraConfig.from_dict([('r', 8)])`", before="raw"),
    Case("unknown-method", lambda tmp: subtune.get_method("nope"), UnknownMethodError,
         ("unknown method 'nope'", "available methods", "lora"), tries="`get_method('nope')`", before="clear"),
    Case("unknown-method-unhashable", lambda tmp: subtune.get_method(["lora"]), UnknownMethodError,
         ("unknown method", "available methods"), tries="`get_method(['lora'])`", before="raw"),
    # LoRA / DoRA
    Case("lora-rank-zero", lambda tmp: subtune.LoraConfig().with_overrides({"r": "0"}), ConfigError,
         ("r must be >= 1",), tries="`--r 0`", before="clear"),
    Case("lora-zero-alpha", lambda tmp: subtune.LoraConfig(lora_alpha=0), ConfigError, ("lora_alpha", "> 0"),
         tries="`LoraConfig(lora_alpha=0)`", before="silent"),
    Case("lora-dropout-one", lambda tmp: subtune.LoraConfig(lora_dropout=1.0), ConfigError,
         ("lora_dropout", "[0, 1)"), tries="`LoraConfig(lora_dropout=1.0)`", before="clear: refused only at prepare"),
    Case("lora-no-targets", lambda tmp: subtune.LoraConfig(target_modules=[]), ConfigError,
         ("target_modules is empty", "q_proj"),
         tries="`LoraConfig(target_modules=[])`", before="clear: refused only at prepare"),
    Case("lora-rank-above-layer", prepare(lambda: subtune.LoraConfig(r=100000)), ConfigError,
         ("r=100000", "largest valid rank for these targets is 16"),
         tries="`LoraConfig(r=100000)` on a 32-wide model", before="silent: allocated billions of trainable values"),
    Case("dora-rank-above-layer", prepare(lambda: subtune.DoraConfig(r=17)), ConfigError,
         ("r=17", "set r <= 16"), tries="`DoraConfig(r=17)` on layers of rank 16", before="silent"),
    Case("lora-target-matches-nothing", prepare(lambda: subtune.LoraConfig(target_modules=["query"])),
         ModelLayoutError, ("['query'] match no linear layer", "q_proj"),
         tries="`target_modules=['query']` on a LLaMA", before="clear"),
    # S2FT
    Case("s2ft-nan-ratio", lambda tmp: subtune.S2FTConfig(d_ratio=NAN), ConfigError, ("d_ratio", "finite"),
         tries="`S2FTConfig(d_ratio=nan)`", before="clear: refused only at prepare"),
    Case("s2ft-ratio-above-one", lambda tmp: subtune.S2FTConfig(d_ratio=1.5), ConfigError, ("d_ratio", "[0, 1]"),
         tries="`S2FTConfig(d_ratio=1.5)`", before="clear: refused only at prepare"),
    Case("s2ft-ratio-for-untargeted", lambda tmp: subtune.S2FTConfig(target_modules=["o_proj"], d_ratio=0.1),
         ConfigError, ("d_ratio=0.1", "down_proj is not in target_modules"),
         tries="`d_ratio=0.1` with `down_proj` not targeted", before="clear: refused only at prepare"),
    Case("s2ft-unknown-target", lambda tmp: subtune.S2FTConfig(target_modules=["q_proj"]), ConfigError,
         ("remove ['q_proj']",),
         tries="`S2FTConfig(target_modules=['q_proj'])`", before="clear: refused only at prepare"),
    Case("s2ft-unknown-strategy", lambda tmp: subtune.S2FTConfig(strategy="best"), ConfigError,
         ("strategy 'best'", "random"), tries="`S2FTConfig(strategy='best')`", before="clear: refused only at prepare"),
    Case("s2ft-bad-direction", lambda tmp: subtune.S2FTConfig(direction="up"), ConfigError,
         ("direction", "['large', 'small']"),
         tries="`S2FTConfig(direction='up')`", before="silent: treated as 'small'"),
    Case("s2ft-bad-allocation-override", lambda tmp: subtune.S2FTConfig().with_overrides({"allocation": "layer"}),
         ConfigError, ("allocation", "'layer' is not one of"), tries="`--allocation layer`", before="clear"),
    Case("s2ft-all-ratios-zero", lambda tmp: subtune.S2FTConfig(o_ratio=0.0, d_ratio=0.0), ConfigError,
         ("every ratio is 0", "d_ratio=0.03"),
         tries="`S2FTConfig(o_ratio=0, d_ratio=0)`", before="silent: nothing trained"),
    Case("s2ft-targets-select-nothing", prepare(lambda: subtune.S2FTConfig(target_modules=["v_proj"])), ConfigError,
         ("nothing would train", "d_ratio"),
         tries="`S2FTConfig(target_modules=['v_proj'])` with `v_ratio` 0", before="silent: nothing trained"),
    Case("s2ft-calibration-batches-zero", lambda tmp: subtune.S2FTConfig(calibration_batches=0), ConfigError,
         ("calibration_batches", ">= 1"),
         tries="`S2FTConfig(calibration_batches=0)`", before="clear: refused only at prepare"),
    Case("s2ft-gradient-without-calibration", prepare(lambda: subtune.S2FTConfig(d_ratio=0.1, strategy="gradient")),
         SubtuneError, ("calibration=",), tries="`strategy='gradient'` without `calibration=`", before="clear"),
    # SMT
    Case("smt-block-size-zero", lambda tmp: subtune.SMTConfig(block_size=0), ConfigError, ("block_size", ">= 1"),
         tries="`SMTConfig(block_size=0)`", before="clear: refused only at prepare"),
    Case("smt-block-larger-than-matrices",
         prepare(lambda: subtune.SMTConfig(block_size=100000, num_blocks=1, warmup_steps=1), [batch()]),
         ConfigError, ("block_size=100000", "larger than every targeted matrix", "block_size <= 32"),
         tries="`SMTConfig(block_size=100000)`", before="raw: tried to allocate 40 GB"),
    Case("smt-zero-ratio", lambda tmp: subtune.SMTConfig(ratio=0.0), ConfigError, ("zero blocks", "ratio > 0"),
         tries="`SMTConfig(ratio=0)`", before="silent: nothing trained"),
    Case("smt-zero-num-blocks", lambda tmp: subtune.SMTConfig(num_blocks=0), ConfigError,
         ("zero blocks", "num_blocks >= 1"), tries="`SMTConfig(num_blocks=0)`", before="silent: nothing trained"),
    Case("smt-more-blocks-than-exist",
         prepare(lambda: subtune.SMTConfig(block_size=8, num_blocks=10**6, warmup_steps=1), [batch()]),
         ConfigError, ("num_blocks=1000000", "num_blocks <= 64"),
         tries="`SMTConfig(num_blocks=10**6)` on a model with 64 blocks",
         before="silent: truncated to the blocks there are"),
    Case("smt-nan-ratio", lambda tmp: subtune.SMTConfig(ratio=NAN), ConfigError, ("ratio", "finite"),
         tries="`SMTConfig(ratio=nan)`", before="clear: refused only at prepare"),
    Case("smt-mlp-ratio-above-one", lambda tmp: subtune.SMTConfig(mlp_ratio=2.0), ConfigError,
         ("mlp_ratio", "[0, 1]"), tries="`SMTConfig(mlp_ratio=2.0)`", before="clear: refused only at prepare"),
    Case("smt-negative-warmup-lr", lambda tmp: subtune.SMTConfig(warmup_lr=-1e-5), ConfigError,
         ("warmup_lr", "> 0"), tries="`SMTConfig(warmup_lr=-1e-5)`", before="silent"),
    Case("smt-warmup-steps-zero", lambda tmp: subtune.SMTConfig(warmup_steps=0), ConfigError,
         ("warmup_steps", ">= 1"), tries="`SMTConfig(warmup_steps=0)`", before="clear: refused only at prepare"),
    Case("smt-unknown-score", lambda tmp: subtune.SMTConfig(score="max"), ConfigError, ("score 'max'", "abs_of_mean"),
         tries="`SMTConfig(score='max')`", before="clear: refused only at prepare"),
    Case("smt-attention-in-mlp-modules", lambda tmp: subtune.SMTConfig(mlp_modules=["q_proj"]), ConfigError,
         ("mlp_modules", "not ['q_proj']"),
         tries="`SMTConfig(mlp_modules=['q_proj'])`", before="clear: refused only at prepare"),
    Case("smt-empty-calibration", prepare(lambda: subtune.SMTConfig(block_size=8, num_blocks=2, warmup_steps=1), []),
         DataError, ("gave no batch", "warm-up batches"), tries="SMT `prepare(calibration=[])`", before="raw"),
    Case("smt-without-calibration", prepare(lambda: subtune.SMTConfig(block_size=8, num_blocks=2)), SubtuneError,
         ("calibration=",), tries="SMT `prepare` without calibration", before="clear"),
    # LaMDA / LaMDA++
    Case("lamda-rank-above-layer", prepare(lambda: subtune.LaMDAConfig(r=40)), ConfigError,
         ("r=40", "exceeds min(out, in)", "largest valid rank for these targets is 16"),
         tries="`LaMDAConfig(r=40)` on layers of rank 16",
         before="clear: an AdapterLoadError without the largest valid rank"),
    Case("lamda-zero-alpha", lambda tmp: subtune.LaMDAConfig(lora_alpha=0.0), ConfigError, ("lora_alpha", "> 0"),
         tries="`LaMDAConfig(lora_alpha=0)`", before="silent"),
    Case("lamda-unknown-init", lambda tmp: subtune.LaMDAConfig(init="random"), ConfigError,
         ("init 'random'", "svd_zero"), tries="`LaMDAConfig(init='random')`", before="clear: refused only at prepare"),
    Case("lamda-freeze-fraction-above-one", lambda tmp: subtune.LaMDAConfig(freeze_fraction=1.5), ConfigError,
         ("freeze_fraction", "[0, 1]"),
         tries="`LaMDAConfig(freeze_fraction=1.5)`", before="clear: refused only at prepare"),
    Case("lamda-nan-freeze-fraction", lambda tmp: subtune.LaMDAConfig(freeze_fraction=NAN), ConfigError,
         ("freeze_fraction", "finite"),
         tries="`LaMDAConfig(freeze_fraction=nan)`", before="clear: refused only at prepare"),
    Case("lamda-negative-freeze-steps", lambda tmp: subtune.LaMDAConfig(freeze_steps=-1), ConfigError,
         ("freeze_steps", ">= 0"), tries="`LaMDAConfig(freeze_steps=-1)`", before="clear: refused only at prepare"),
    Case("lamda-bad-freeze-order", lambda tmp: subtune.LaMDAConfig(freeze_order="random"), ConfigError,
         ("freeze_order", "largest_first"), tries="`LaMDAConfig(freeze_order='random')`", before="silent"),
    Case("lamdapp-rank-bounds", lambda tmp: subtune.LaMDAPlusConfig(rank_min=16, rank_max=8), ConfigError,
         ("rank_multiple <= rank_min <= rank_max", "rank_max=8"),
         tries="`LaMDAPlusConfig(rank_min=16, rank_max=8)`", before="clear: refused only at prepare"),
    Case("lamdapp-rank-not-multiple", lambda tmp: subtune.LaMDAPlusConfig(rank_min=12), ConfigError,
         ("multiples of rank_multiple",),
         tries="`LaMDAPlusConfig(rank_min=12)` (not a multiple of `rank_multiple`)",
         before="clear: refused only at prepare"),
    Case("lamdapp-r-below-rank-min", lambda tmp: subtune.LaMDAPlusConfig(r=4), ConfigError,
         ("r=4", "rank_min=8", "r >= rank_min"), tries="`LaMDAPlusConfig(r=4)` below `rank_min=8`", before="raw"),
    # full, and the generic checks on the zeroth-order configs
    Case("full-string-flag", lambda tmp: subtune.FullConfig(train_embeddings="no"), ConfigError,
         ("train_embeddings", "a bool"), tries="`FullConfig(train_embeddings='no')`", before="silent: 'no' meant true"),
    Case("full-bad-flag-override", lambda tmp: subtune.FullConfig().with_overrides({"train_embeddings": "maybe"}),
         ConfigError, ("train_embeddings: expected true/false",), tries="`--train_embeddings maybe`", before="clear"),
    Case("senszo-nan-eps", lambda tmp: subtune.SensZOConfig(eps=NAN), ConfigError, ("eps", "finite"),
         tries="`SensZOConfig(eps=nan)`", before="silent"),
    Case("mezo-inf-eps-override", lambda tmp: subtune.MeZOConfig().with_overrides({"eps": "inf"}), ConfigError,
         ("eps", "finite"), tries="`--eps inf` (MeZO)", before="silent"),
    Case("mezo-fractional-directions", lambda tmp: subtune.MeZOConfig(directions=1.5), ConfigError,
         ("directions", "an int"), tries="`MeZOConfig(directions=1.5)`", before="raw"),
    Case("mezo-bad-objective", lambda tmp: subtune.MeZOConfig(objective="mse"), ConfigError,
         ("objective", "['auto', 'lm', 'choice']"), tries="`MeZOConfig(objective='mse')`", before="silent: treated as 'lm'"),
]

DATA_CASES = [
    Case("data-non-utf8", lambda tmp: load_records(tmp / "latin.json"), DataError,
         ("latin.json", "line 2", "byte", "utf-8"), tries="a Latin-1 data file", before="raw: no file, no line"),
    Case("data-missing-file", lambda tmp: load_records(tmp / "missing.json"), DataError,
         ("neither an embedded task", "arithmetic"), tries="a data path that does not exist", before="clear"),
    Case("data-directory", lambda tmp: load_records(tmp), DataError, ("is a directory", ".jsonl file"),
         tries="a directory as the data file", before="clear"),
    Case("data-missing-split", lambda tmp: load_records("arithmetic", "validation"), DataError,
         ("no split 'validation'", "['test', 'train']"),
         tries="an embedded task's split that does not exist", before="raw: FileNotFoundError"),
    Case("data-malformed-record", lambda tmp: load_records(tmp / "bad.json"), DataError,
         ("bad.json, line 3", "['output']", "llm-adapters"), tries="a record without `output`", before="clear"),
    Case("data-invalid-jsonl", lambda tmp: load_records(tmp / "bad.jsonl"), DataError,
         ("bad.jsonl: line 2", "invalid json"), tries="a JSON-lines file with a broken line", before="clear"),
    Case("data-invalid-json-list", lambda tmp: load_records(tmp / "list.json"), DataError,
         ("list.json: line 2", "invalid json"), tries="a JSON list with a broken record", before="clear"),
    Case("data-unterminated-list", lambda tmp: load_records(tmp / "open.json"), DataError,
         ("open.json", "unterminated"), tries="a JSON list never closed", before="clear"),
    Case("data-empty", lambda tmp: load_records(tmp / "empty.json"), DataError, ("no records", "instruction"),
         tries="`[]` as the data file", before="clear"),
    Case("data-record-not-object", lambda tmp: load_records(tmp / "strings.json"), DataError,
         ("line 1", "expected an object", "str"), tries="records that are strings", before="clear"),
    Case("data-input-not-string", lambda tmp: load_records(tmp / "input.jsonl"), DataError,
         ("line 1", "'input' must be a string"), tries="`\"input\": 5`", before="clear"),
    Case("data-missing-answer", lambda tmp: load_records(tmp / "noanswer.jsonl", need_answer=True), DataError,
         ("line 1", "['answer']"), tries="a record without `answer` where one is needed", before="clear"),
    Case("data-choices-not-list", lambda tmp: load_records(tmp / "choices.jsonl"), DataError,
         ("line 1", "'choices' must be a list of strings"),
         tries="`\"choices\": \"abc\"`", before="silent: matched substrings"),
    Case("data-choice-objective-without-choices", lambda tmp: encode_choice_record(CharTokenizer(), RECORD),
         DataError, ("choices", "answer"), tries="the choice objective on a record without `choices`", before="clear"),
    Case("calibration-no-records", lambda tmp: calibration_batches(CharTokenizer(), []), DataError,
         ("at least one record",), tries="calibration batches from no records", before="raw: ZeroDivisionError"),
    Case("calibration-zero-batch-size", lambda tmp: calibration_batches(CharTokenizer(), [RECORD], batch_size=0),
         ConfigError, ("batch_size", ">= 1"), tries="calibration batches of size 0", before="raw"),
    Case("config-file-broken-yaml", lambda tmp: read_config_file(tmp / "bad.yaml"), ConfigError,
         ("bad.yaml", "line 3", "invalid yaml"), tries="a YAML config with a syntax error", before="raw"),
    Case("config-file-missing", lambda tmp: read_config_file(tmp / "none.yaml"), ConfigError,
         ("none.yaml does not exist", "yaml or json file"), tries="a config file that does not exist", before="clear"),
    Case("config-file-not-mapping", lambda tmp: read_config_file(tmp / "list.yaml"), ConfigError,
         ("list.yaml", "mapping"), tries="a YAML config that is a list", before="clear"),
    Case("config-file-non-utf8", lambda tmp: read_config_file(tmp / "latin.yaml"), ConfigError,
         ("latin.yaml", "utf-8"), tries="a Latin-1 YAML config", before="raw"),
    Case("config-file-number-keys", lambda tmp: read_config_file(tmp / "keys.yaml"), ConfigError,
         ("keys.yaml", "keys must be field names"), tries="a YAML config whose key is a number", before="raw"),
    Case("config-file-other-method", lambda tmp: make_config("s2ft", {"method": "lora", "r": 8}), ConfigError,
         ("method 'lora'", "'s2ft'", "make them agree"),
         tries="a config file for LoRA used with `--method s2ft`", before="silent"),
    Case("config-file-nan", lambda tmp: make_config("lora", read_config_file(tmp / "nan.yaml")), ConfigError,
         ("lora_alpha", "finite"), tries="`lora_alpha: .nan` in a YAML config", before="silent"),
    Case("model-not-found", lambda tmp: load_model(str(tmp / "nowhere")), ModelNotFoundError,
         ("not 'default' or a local hf model directory", "never downloads"),
         tries="`--model` a directory that does not exist", before="clear"),
    Case("model-bad-dtype", lambda tmp: load_model("default", "fp8"), ConfigError,
         ("dtype 'fp8'", "bf16"), tries="`--dtype fp8`", before="clear"),
    Case("eval-no-records", lambda tmp: evaluate(make_tiny(0), CharTokenizer(), []), DataError,
         ("empty", "--limit"), tries="evaluate on no records", before="silent: accuracy 0, perplexity 1.0"),
    Case("eval-zero-batch-size", lambda tmp: evaluate(make_tiny(0), CharTokenizer(), [RECORD], batch_size=0),
         ConfigError, ("batch_size", ">= 1"), tries="evaluate with batch size 0", before="raw"),
    Case("eval-zero-new-tokens", lambda tmp: evaluate(make_tiny(0), CharTokenizer(), [RECORD], max_new_tokens=0),
         ConfigError, ("max_new_tokens", ">= 1"), tries="evaluate with `max_new_tokens=0`", before="raw"),
    Case("perplexity-no-records", lambda tmp: perplexity(make_tiny(0), CharTokenizer(), []), DataError,
         ("empty",), tries="perplexity of no records", before="silent"),
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
         ("unknown method 'nope'", "subtune methods"), tries="`subtune train --method nope`", before="clear"),
    Case("cli-train-unknown-key", cli("train", "--method", "lora", "--rank", "8", "--output", "{tmp}/run"), CliError,
         ("unknown config key(s) ['rank']", "'r'"),
         tries="`subtune train --rank 8` (the field is `r`)", before="clear"),
    Case("cli-train-missing-data", cli("train", "--method", "lora", "--data", "{tmp}/missing.json", "--output",
                                       "{tmp}/run"), CliError, ("neither an embedded task",),
         tries="`subtune train --data missing.json`", before="clear"),
    Case("cli-train-non-utf8-data", cli("train", "--method", "lora", "--data", "{tmp}/latin.json", "--output",
                                        "{tmp}/run"), CliError, ("latin.json, line 2", "utf-8"),
         tries="`subtune train --data` a Latin-1 file", before="raw"),
    Case("cli-train-missing-model", cli("train", "--method", "lora", "--model", "{tmp}/nowhere", "--output",
                                        "{tmp}/run"), CliError, ("not 'default' or a local hf model directory",),
         tries="`subtune train --model` a missing directory", before="clear"),
    Case("cli-train-broken-yaml", cli("train", "--method", "lora", "--config", "{tmp}/bad.yaml", "--output",
                                      "{tmp}/run"), CliError, ("bad.yaml, line 3", "invalid yaml"),
         tries="`subtune train --config` a broken YAML file", before="raw"),
    Case("cli-train-config-other-method", cli("train", "--method", "s2ft", "--config", "{tmp}/lora.yaml",
                                              "--output", "{tmp}/run"), CliError, ("'lora'", "make them agree"),
         tries="`subtune train --method s2ft --config` a LoRA config", before="silent"),
    Case("cli-train-nan-override", cli("train", "--method", "lora", "--lora_alpha", "nan", "--output", "{tmp}/run"),
         CliError, ("lora_alpha", "finite"), tries="`subtune train --lora_alpha nan`", before="silent"),
    Case("cli-train-string-rank", cli("train", "--method", "lora", "--r", "8.5", "--output", "{tmp}/run"), CliError,
         ("r: expected int",), tries="`subtune train --r 8.5`", before="clear"),
    Case("cli-train-duplicate-override", cli("train", "--method", "lora", "--r", "8", "--r", "4", "--output",
                                             "{tmp}/run"), CliError, ("--r is given twice", "give it once"),
         tries="`subtune train --r 8 --r 4`", before="silent: the last one won"),
    Case("cli-train-stray-argument", cli("train", "--method", "lora", "stray", "--output", "{tmp}/run"), CliError,
         ("unexpected argument 'stray'", "--key value"), tries="`subtune train stray`", before="clear"),
    # eval
    Case("cli-eval-missing-adapter", cli("eval", "--adapter", "{tmp}/nowhere"), CliError,
         ("nowhere", "does not exist"), tries="`subtune eval --adapter` a missing directory", before="clear"),
    Case("cli-eval-limit-zero", cli("eval", "--limit", "0"), CliError, ("--limit", "x>=1"),
         tries="`subtune eval --limit 0`", before="silent: accuracy 0, perplexity 1.0"),
    Case("cli-eval-limit-negative", cli("eval", "--limit", "-5"), CliError, ("--limit", "x>=1"),
         tries="`subtune eval --limit -5`", before="silent: dropped the last records"),
    Case("cli-eval-batch-size-zero", cli("eval", "--batch-size", "0"), CliError, ("--batch-size", "x>=1"),
         tries="`subtune eval --batch-size 0`", before="raw"),
    Case("cli-eval-max-new-tokens-zero", cli("eval", "--max-new-tokens", "0"), CliError,
         ("--max-new-tokens", "x>=1"), tries="`subtune eval --max-new-tokens 0`", before="raw"),
    Case("cli-eval-missing-split", cli("eval", "--split", "dev"), CliError, ("no split 'dev'", "['test', 'train']"),
         tries="`subtune eval --split dev`", before="raw"),
    Case("cli-eval-non-utf8-task", cli("eval", "--task", "{tmp}/latin.json"), CliError, ("line 2", "utf-8"),
         tries="`subtune eval --task` a Latin-1 file", before="raw"),
    Case("cli-eval-predictions-unwritable", cli("eval", "--predictions", "{tmp}/afile/p.json"), CliError,
         ("--predictions", "is a file, not a directory", "another path"),
         tries="`subtune eval --predictions` below a file", before="raw: failed after the whole evaluation"),
    # export
    Case("cli-export-max-rank-zero", cli("export", "--adapter", "{tmp}/nowhere", "--out", "{tmp}/o", "--max-rank",
                                         "0"), CliError, ("--max-rank", "x>=1"),
         tries="`subtune export --max-rank 0`", before="clear: late, after loading"),
    Case("cli-export-max-rank-negative", cli("export", "--adapter", "{tmp}/nowhere", "--out", "{tmp}/o",
                                             "--max-rank", "-3"), CliError, ("--max-rank", "x>=1"),
         tries="`subtune export --max-rank -3`", before="clear: late, after loading"),
    Case("cli-export-missing-adapter", cli("export", "--adapter", "{tmp}/nowhere", "--out", "{tmp}/o"), CliError,
         ("nowhere", "does not exist"), tries="`subtune export --adapter` a missing directory", before="clear"),
    Case("cli-export-out-unwritable", cli("export", "--adapter", "{tmp}/nowhere", "--out", "{tmp}/afile/lora"),
         CliError, ("--out", "is a file, not a directory"),
         tries="`subtune export --out` below a file", before="raw: late, after loading"),
    # bench
    Case("cli-bench-unknown-method", cli("bench", "--methods", "lora,nope", "--out", "{tmp}/b"), CliError,
         ("unknown method 'nope'", "available methods"), tries="`subtune bench --methods lora,nope`", before="clear"),
    Case("cli-bench-no-methods", cli("bench", "--methods", ",", "--out", "{tmp}/b"), CliError,
         ("--methods", "name at least one"), tries="`subtune bench --methods ,`", before="silent: ran only the floors"),
    Case("cli-bench-unknown-preset", cli("bench", "--preset", "7b", "--budget", "1000", "--out", "{tmp}/b"),
         CliError, ("preset '7b'", "llama2-7b"),
         tries="`subtune bench --preset 7b --budget 1000`", before="silent: exit 0 with error rows"),
    Case("cli-bench-batch-zero", cli("bench", "--batch", "0"), CliError, ("--batch", "x>=1"),
         tries="`subtune bench --batch 0`", before="silent"),
    Case("cli-bench-steps-zero", cli("bench", "--steps", "0"), CliError, ("--steps", "x>=1"),
         tries="`subtune bench --steps 0`", before="silent"),
    Case("cli-bench-negative-warmup", cli("bench", "--warmup", "-1"), CliError, ("--warmup", "x>=0"),
         tries="`subtune bench --warmup -1`", before="silent"),
    Case("cli-bench-budget-zero", cli("bench", "--budget", "0"), CliError, ("--budget", "x>=1"),
         tries="`subtune bench --budget 0`", before="silent: fell back to the default budget"),
    Case("cli-bench-out-unwritable", cli("bench", "--preset", "tiny", "--out", "{tmp}/afile/b"), CliError,
         ("--out", "is a file, not a directory"),
         tries="`subtune bench --out` below a file", before="raw: after the whole benchmark"),
    # senszo-mask
    Case("cli-senszo-mask-density-zero", cli("senszo-mask", "--out", "{tmp}/m.safetensors", "--density", "0"),
         CliError, ("--density", "0.0<x<=1.0"),
         tries="`subtune senszo-mask --density 0`", before="silent: wrote an empty mask"),
    Case("cli-senszo-mask-density-nan", cli("senszo-mask", "--out", "{tmp}/m.safetensors", "--density", "nan"),
         CliError, ("--density", "not a finite number"), tries="`subtune senszo-mask --density nan`", before="silent"),
    Case("cli-senszo-mask-samples-zero", cli("senszo-mask", "--out", "{tmp}/m.safetensors", "--samples", "0"),
         CliError, ("--samples", "x>=1"), tries="`subtune senszo-mask --samples 0`", before="raw"),
    Case("cli-senszo-mask-seq-one", cli("senszo-mask", "--out", "{tmp}/m.safetensors", "--seq", "1"), CliError,
         ("--seq", "x>=2"), tries="`subtune senszo-mask --seq 1`", before="raw"),
    Case("cli-senszo-mask-out-unwritable", cli("senszo-mask", "--out", "{tmp}/afile/m.safetensors"), CliError,
         ("--out", "is a file, not a directory"),
         tries="`subtune senszo-mask --out` below a file", before="raw: after computing the mask"),
    Case("cli-senszo-mask-non-utf8-data", cli("senszo-mask", "--out", "{tmp}/m.safetensors", "--data",
                                              "{tmp}/latin.json"), CliError, ("latin.json, line 2", "utf-8"),
         tries="`subtune senszo-mask --data` a Latin-1 file", before="raw"),
    # demo
    Case("cli-demo-steps-zero", cli("demo", "--steps", "0", "--output", "{tmp}/demo"), CliError, ("--steps", "x>=1"),
         tries="`subtune demo --steps 0`", before="silent"),
    Case("cli-demo-limit-zero", cli("demo", "--limit", "0", "--output", "{tmp}/demo"), CliError, ("--limit", "x>=1"),
         tries="`subtune demo --limit 0`", before="silent"),
    Case("cli-demo-unknown-method", cli("demo", "--methods", "lora,nope", "--output", "{tmp}/demo"), CliError,
         ("unknown method 'nope'", "available methods"),
         tries="`subtune demo --methods lora,nope`", before="clear: late, after the zero-shot evaluation"),
    Case("cli-demo-missing-task", cli("demo", "--task", "{tmp}/missing.json", "--output", "{tmp}/demo"), CliError,
         ("neither an embedded task",), tries="`subtune demo --task missing.json`", before="clear"),
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
    from subtune.recipes import demo_methods

    for method_id, settings in demo_methods().items():
        assert make_config(method_id, settings.get("config")).method == method_id


def test_config_error_is_a_subtune_value_error():
    assert issubclass(ConfigError, SubtuneError) and issubclass(ConfigError, ValueError)
    assert issubclass(UnknownMethodError, KeyError) and issubclass(ModelNotFoundError, FileNotFoundError)
    assert str(UnknownMethodError("unknown method 'x'")) == "unknown method 'x'"  # no KeyError quotes


def test_every_error_of_core_errors_is_exported():
    """A user catches subtune's errors as `subtune.X` (e.g. `except subtune.TrainingDivergedError`)."""
    import subtune.core.errors as errors

    classes = {name for name, value in vars(errors).items()
               if isinstance(value, type) and issubclass(value, SubtuneError)}
    assert {"TrainingDivergedError", "CheckpointError", "RunExistsError"} <= classes
    assert all(getattr(subtune, name, None) is getattr(errors, name) for name in classes)
    assert classes <= set(subtune.__all__)


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
    result = CliRunner().invoke(main, ["eval", "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "reported as null" in result.stderr  # the CLI shows warnings as one line
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
