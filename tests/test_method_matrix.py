"""The generic contract every method meets (DESIGN.md, Conventions)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, perturb_trainable
from method_cases import CASES

import subtune
from subtune.core.errors import AdapterLoadError, ExportError, ModelLayoutError

METHODS = sorted(CASES)


def test_every_registered_method_has_a_case():
    assert {CASES[m]["config"]().method for m in METHODS} == set(subtune.available_methods())


def calibration(batch):
    return [batch, batch]


def prepared(method_id, batch, seed=0, **kwargs):
    model = make_tiny(seed, **kwargs)
    return subtune.prepare(model, CASES[method_id]["config"](), calibration=calibration(batch))


@torch.no_grad()
def logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("method_id", METHODS)
def test_attach_without_training_leaves_logits_unchanged(method_id, batch):
    reference = logits(make_tiny(0), batch)
    model = prepared(method_id, batch)
    torch.testing.assert_close(logits(model, batch), reference, atol=1e-6, rtol=0)
    assert subtune.trainable_summary(model).trainable > 0


@pytest.mark.parametrize("method_id", METHODS)
def test_save_then_load_in_a_fresh_model_reproduces_logits(method_id, batch, tmp_path):
    model = prepared(method_id, batch)
    perturb_trainable(model)
    trained = logits(model, batch)
    assert not torch.allclose(trained, logits(make_tiny(0), batch), atol=1e-4)  # the perturbation is visible
    subtune.save(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter.safetensors"}
    reloaded = subtune.load(make_tiny(0), tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), trained, atol=0, rtol=0)


@pytest.mark.parametrize("method_id", METHODS)
def test_merge_equals_unmerged_forward_and_unmerge_restores(method_id, batch):
    model = prepared(method_id, batch)
    perturb_trainable(model)
    unmerged = logits(model, batch)
    subtune.merge(model)
    torch.testing.assert_close(logits(model, batch), unmerged, atol=1e-5, rtol=0)
    subtune.unmerge(model)
    torch.testing.assert_close(logits(model, batch), unmerged, atol=1e-5, rtol=0)
    subtune.unload(model)
    assert not hasattr(model, "subtune_state")
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in model.modules())
    torch.testing.assert_close(logits(model, batch), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method_id", [m for m in METHODS if CASES[m]["exports_lora"]])
def test_exported_lora_loads_in_peft_with_equal_logits(method_id, batch, tmp_path):
    from peft import PeftModel

    model = prepared(method_id, batch)
    perturb_trainable(model)
    subtune.export_lora(model, tmp_path)
    subtune.merge(model)
    peft_model = PeftModel.from_pretrained(make_tiny(0), tmp_path)
    torch.testing.assert_close(logits(peft_model, batch), logits(model, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method_id", [m for m in METHODS if not CASES[m]["exports_lora"]])
def test_methods_without_a_low_rank_form_refuse_lora_export(method_id, batch, tmp_path):
    model = prepared(method_id, batch)
    with pytest.raises(ExportError, match="merge"):
        subtune.export_lora(model, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("method_id", METHODS)
def test_loading_onto_a_different_base_is_refused_before_any_change(method_id, batch, tmp_path):
    model = prepared(method_id, batch)
    subtune.save(model, tmp_path)
    other = make_tiny(seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="different base model"):
        subtune.load(other, tmp_path)
    assert not hasattr(other, "subtune_state")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert sorted(before) == sorted(other.state_dict())


@pytest.mark.parametrize("method_id", METHODS)
def test_corrupt_or_missing_adapter_files_are_refused(method_id, batch, tmp_path):
    model = prepared(method_id, batch)
    subtune.save(model, tmp_path)
    weights = tmp_path / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    with pytest.raises(AdapterLoadError, match="checksum"):
        subtune.load(make_tiny(0), tmp_path)
    weights.unlink()
    with pytest.raises(AdapterLoadError, match="missing"):
        subtune.load(make_tiny(0), tmp_path)
    with pytest.raises(AdapterLoadError, match="does not exist"):
        subtune.load(make_tiny(0), tmp_path / "nowhere")


FREE_TARGETS = [m for m in METHODS if CASES[m]["config"]().method in ("lora", "dora", "lamda", "lamda++")]
FIXED_TARGETS = [m for m in METHODS if CASES[m]["config"]().method in ("s2ft", "smt")]
FREE_TARGETS += [m for m in METHODS if CASES[m]["config"]().method == "senszo"]


@pytest.mark.parametrize("method_id", FIXED_TARGETS)
def test_methods_with_fixed_candidates_name_the_allowed_targets(method_id):
    with pytest.raises(subtune.ConfigError, match=r"\['query'\]"):
        CASES[method_id]["config"]().with_overrides({"target_modules": ["query", "v_proj"]})


@pytest.mark.parametrize("method_id", FREE_TARGETS)
def test_targets_that_match_nothing_list_the_existing_names(method_id, batch):
    config = CASES[method_id]["config"]().with_overrides({"target_modules": ["query", "v_proj"]})
    with pytest.raises(ModelLayoutError, match=r"\['query'\] match no linear layer.*'down_proj'"):
        subtune.prepare(make_tiny(0), config, calibration=calibration(batch))


@pytest.mark.parametrize("method_id", METHODS)
def test_a_model_without_the_llama_layout_is_refused(method_id, batch):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ModelLayoutError, match="LLaMA module layout"):
        subtune.prepare(gpt2, CASES[method_id]["config"](), calibration=calibration(batch))


@pytest.mark.parametrize("method_id", METHODS)
def test_preparing_twice_is_refused(method_id, batch):
    model = prepared(method_id, batch)
    with pytest.raises(subtune.SubtuneError, match="fresh base"):
        subtune.prepare(model, CASES[method_id]["config"](), calibration=calibration(batch))


def test_lora_trained_with_the_trainer_reloads_in_a_fresh_process_with_identical_logits(batch, tmp_path):
    from conftest import CharTokenizer

    from subtune.train.trainer import build_trainer

    model = prepared("lora", batch)
    records = [{"instruction": f"question {i}", "output": f"answer {i % 4}"} for i in range(16)]
    build_trainer(model, CharTokenizer(), records, tmp_path / "run", max_steps=3, batch_size=8, learning_rate=1e-2,
                  save_steps=100, progress=False).train()
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B moved off zero
    torch.save(batch["input_ids"], tmp_path / "ids.pt")  # test-only file, written and read by this test
    subtune.save(model, tmp_path / "adapter")
    script = textwrap.dedent(f"""
        import sys, torch, subtune
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import make_tiny
        model = subtune.load(make_tiny(0), {str(tmp_path / 'adapter')!r})
        ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(tmp_path / 'out.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    fresh = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(fresh, logits(model, {"input_ids": batch["input_ids"], "attention_mask": None}))
