"""CLI smoke tests on the embedded default model (a few steps each; the library tests cover correctness)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from subtune.cli import main


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_console_script_help():
    exe = Path(sys.executable).with_name("subtune")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("train", "eval", "demo", "bench", "export", "methods"):
        assert command in out


def test_train_resume_eval_export_on_the_embedded_default(tmp_path):
    run = tmp_path / "run"
    result = invoke("train", "--method", "s2ft", "--max-steps", 2, "--batch-size", 4, "--save-steps", 1,
                    "--output", run, "--d_ratio", "0.05", "--o_ratio", "0.1")
    assert result.exit_code == 0, result.output
    assert (run / "adapter" / "adapter.safetensors").is_file()
    assert (run / "checkpoint-2" / "adapter" / "adapter_config.json").is_file()
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["method"] == "s2ft" and cfg["config"]["d_ratio"] == 0.05

    resumed = invoke("train", "--method", "s2ft", "--max-steps", 3, "--batch-size", 4, "--save-steps", 1,
                     "--output", run, "--resume", "--d_ratio", "0.05", "--o_ratio", "0.1")
    assert resumed.exit_code == 0, resumed.output
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3

    evaluated = invoke("eval", "--adapter", run / "adapter", "--limit", 8)
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output[evaluated.output.index("{"):])
    assert report["total"] == 8 and 0.0 <= report["accuracy"] <= 1.0 and report["perplexity"] > 1.0

    exported = invoke("export", "--adapter", run / "adapter", "--out", tmp_path / "lora")
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def test_demo_prints_before_and_after_table(tmp_path):
    result = invoke("demo", "--methods", "lora", "--steps", 2, "--limit", 8, "--output", tmp_path)
    assert result.exit_code == 0, result.output
    assert "| lora |" in result.output and "accuracy before" in result.output


@pytest.mark.parametrize("args, message", [
    (["train", "--method", "nope"], "unknown method 'nope'"),
    (["train", "--method", "lora", "--data", "missing.json"], "neither an embedded task"),
    (["train", "--method", "lora", "--rank", "8"], "unknown config key(s) ['rank']"),
    (["train", "--method", "lora", "--model", "/nonexistent"], "not 'default' or a local HF model directory"),
    (["eval", "--adapter", "/nonexistent"], "does not exist"),
])
def test_bad_input_gives_a_clear_error(args, message, tmp_path):
    result = CliRunner().invoke(main, args + (["--output", str(tmp_path)] if args[0] == "train" else []))
    assert result.exit_code != 0
    assert message in result.output
