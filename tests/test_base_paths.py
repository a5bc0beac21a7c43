"""Base paths that travel: adapters and exports record where their base is (absolute, and the embedded model's id),
so `subtune eval/export --adapter DIR` and PEFT's AutoPeftModelForCausalLM find it from any working directory."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import subtune
from conftest import make_tiny, perturb_trainable
from reliability import Case, cases_param, check_case
from subtune.cli import main
from subtune.core.bases import base_of_adapter
from subtune.eval.evaluate import evaluate
from subtune.zoo import DEFAULT_DIR, adapter_base, load_model

RECORDS = [{"instruction": "Which number is larger?", "input": f"{a} or {b}", "output": f"the larger is {max(a, b)}.",
            "answer": str(max(a, b))} for a, b in [(3, 9), (41, 12), (7, 70)]]


@pytest.fixture
def local_base(tmp_path):
    """A tiny random LLaMA saved with save_pretrained in tmp/models/tiny, with the embedded tokenizer beside it."""
    directory = tmp_path / "models" / "tiny"
    make_tiny(0, vocab=1408).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_DIR / name, directory / name)
    return directory


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return path


def trained_adapter(name: str, out, config=None):
    """load_model(name) -> LoRA, moved off its init -> saved to `out`; returns the model."""
    model, _ = load_model(name)
    subtune.prepare(model, config or subtune.LoraConfig(r=2, seed=0))
    perturb_trainable(model)
    subtune.save(model, out)
    return model


def adapter_config(directory) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(1, 17)[None]).logits


def test_a_relative_local_base_is_recorded_absolute_and_eval_finds_it_from_elsewhere(local_base, task_file, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = trained_adapter("models/tiny", tmp_path / "adapter")  # typed relative, as a user would
    assert adapter_config(tmp_path / "adapter")["base_model_name_or_path"] == str(local_base.resolve())
    tokenizer = load_model("models/tiny")[1]
    reference = evaluate(model, tokenizer, RECORDS, progress=False)  # same process, same model: the reference
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(main, ["eval", "--adapter", str(tmp_path / "adapter"), "--task", str(task_file)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["correct"] == reference.correct
    assert summary["perplexity"] == pytest.approx(reference.perplexity, rel=1e-5)


def test_a_moved_base_is_refused_with_the_flag_to_use_and_model_still_overrides(local_base, task_file, tmp_path,
                                                                               monkeypatch):
    trained_adapter(str(local_base), tmp_path / "adapter")
    moved = shutil.move(local_base, tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--adapter", str(tmp_path / "adapter"), "--task", str(task_file), "--limit", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Error:" in result.output and "--model DIR" in result.output
    assert str(local_base.resolve()) in result.output
    result = CliRunner().invoke(main, args + ["--model", str(moved)])
    assert result.exit_code == 0, result.output


def test_the_embedded_model_is_recorded_by_id_and_path():
    model, _ = load_model("default")
    subtune.prepare(model, subtune.LoraConfig(r=2))
    state = subtune.core.api.state_of(model)
    assert state.base_name == "default"
    from subtune.core.bases import base_record

    assert base_record(state.base_name) == {"base_model_name_or_path": str(DEFAULT_DIR), "subtune_base": "default"}
    # another install's copy: the id wins over a recorded path that is not there
    assert base_of_adapter({"base_model_name_or_path": "/elsewhere/zoo/default", "subtune_base": "default"}) == \
        "default"
    assert base_of_adapter({"base_model_name_or_path": "default"}) == "default"  # adapters saved before the id
    assert base_of_adapter({"base_model_name_or_path": None}) == "default"
    with pytest.raises(subtune.ModelNotFoundError, match="--model DIR"):
        base_of_adapter({"base_model_name_or_path": "models/tiny-llama"}, "runs/x/adapter")


def test_exported_lora_of_a_local_base_opens_offline_in_auto_peft(local_base, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(local_base.parent)
    model = trained_adapter("tiny", tmp_path / "adapter")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = CliRunner().invoke(main, ["export", "--adapter", str(tmp_path / "adapter"), "--out", "lora"])
    assert result.exit_code == 0, result.output
    assert adapter_config(elsewhere / "lora")["base_model_name_or_path"] == str(local_base.resolve())
    monkeypatch.chdir(tmp_path)  # PEFT reads the path from the export alone
    peft_model = AutoPeftModelForCausalLM.from_pretrained(elsewhere / "lora", local_files_only=True).eval()
    torch.testing.assert_close(logits(peft_model), logits(model.eval()), rtol=1e-5, atol=1e-5)


def test_export_with_base_writes_the_embedded_model_beside_the_adapter(tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    model = trained_adapter("default", tmp_path / "adapter", subtune.S2FTConfig(d_ratio=0.05))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", "--adapter", "adapter", "--out", "lora", "--with-base"])
    assert result.exit_code == 0, result.output
    base_copy = (tmp_path / "lora" / "base").resolve()
    assert adapter_config(tmp_path / "lora")["base_model_name_or_path"] == str(base_copy)
    assert (base_copy / "model.safetensors").read_bytes() == (DEFAULT_DIR / "model.safetensors").read_bytes()
    assert (base_copy / "tokenizer.json").is_file()
    peft_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "lora", local_files_only=True).eval()
    torch.testing.assert_close(logits(peft_model), logits(model.eval()), rtol=1e-5, atol=1e-5)
    refused = CliRunner().invoke(main, ["export", "--adapter", "adapter", "--out", "m", "--format", "merged",
                                        "--with-base"])
    assert refused.exit_code == 2 and "--with-base is for --format lora" in refused.output


# ------------------------------------------------------------------------------------- bad inputs (RELIABILITY.md)

def _adapter_of_a_removed_base(tmp):
    directory = tmp / "gone"
    make_tiny(0, vocab=1408).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_DIR / name, directory / name)
    trained_adapter(str(directory), tmp / "adapter")
    shutil.rmtree(directory)


def _adapter_with_a_bad_base_id(tmp):
    trained_adapter("default", tmp / "adapter")
    cfg = adapter_config(tmp / "adapter")
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "subtune_base": 5}))


CASES = [
    Case("adapter-base-gone", lambda tmp: adapter_base(tmp / "adapter"), subtune.ModelNotFoundError,
         ("gone", "not a model directory", "--model dir"), setup=_adapter_of_a_removed_base,
         tries="`subtune eval --adapter` whose base directory was moved or deleted",
         before="raw: 'not a local HF model directory' naming the path as typed, from any other directory"),
    Case("adapter-base-id-not-string", lambda tmp: adapter_base(tmp / "adapter"), subtune.AdapterLoadError,
         ("subtune_base", "re-save"), setup=_adapter_with_a_bad_base_id,
         tries="an adapter_config.json whose `subtune_base` is a number", before="new"),
]


@cases_param(CASES)
def test_catalogue_base_paths(case, tmp_path):
    check_case(case, tmp_path)
