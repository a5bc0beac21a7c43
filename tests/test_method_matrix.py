"""The generic contract every method meets (DESIGN.md, Conventions)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, perturb_trainable
from method_cases import CASES

import subtune
from subtune.core.deltas import Delta
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


# -- the update record read back with no method code ---------------------------------------------------------------

READER = textwrap.dedent("""
    import json, sys, types
    from pathlib import Path

    src, tests, root = (Path(a) for a in sys.argv[1:4])
    package = types.ModuleType("subtune")  # the package without its __init__, which imports every method
    package.__path__ = [str(src / "subtune")]
    sys.modules["subtune"] = package
    sys.path.insert(0, str(tests))
    from conftest import make_tiny
    from subtune.core.adapter_format import read_deltas
    from subtune.core.deltas import write_delta_file

    for adapter in sorted(p for p in root.iterdir() if p.is_dir()):
        changed = json.loads((adapter / "adapter_config.json").read_text())["base_changed"]
        deltas = read_deltas(adapter, base=make_tiny(0) if changed else None)
        write_delta_file(root / f"{adapter.name}.deltas.safetensors", deltas)
    print(json.dumps(sorted(m for m in sys.modules if m.startswith(("subtune", "peft")))))
""")


@pytest.fixture(scope="module")
def read_back(tmp_path_factory):
    """Every CASES row prepared, perturbed and saved; then one fresh interpreter that imports no method reads each
    adapter with read_deltas and writes the deltas to a plain delta file. Returns (root, trained logits per row,
    the subtune/peft modules that interpreter had imported)."""
    root = tmp_path_factory.mktemp("read_back")
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    trained = {}
    for method_id in METHODS:
        model = prepared(method_id, batch)
        perturb_trainable(model)
        trained[method_id] = logits(model, batch)
        subtune.save(model, root / method_id)
    src = Path(subtune.__file__).parents[1]
    result = subprocess.run([sys.executable, "-c", READER, str(src), str(Path(__file__).parent), str(root)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, trained, json.loads(result.stdout.splitlines()[-1]), batch


def test_reading_deltas_imports_no_method_code(read_back):
    imported = read_back[2]
    assert "subtune.core.adapter_format" in imported
    assert not [m for m in imported if m.startswith(("subtune.methods", "subtune.ops", "peft"))], imported


@pytest.mark.parametrize("method_id", METHODS)
def test_deltas_read_with_no_method_code_merge_into_a_fresh_base_to_the_trained_logits(method_id, read_back):
    from subtune.core.deltas import read_delta_file

    root, trained, _, batch = read_back
    deltas, _ = read_delta_file(root / f"{method_id}.deltas.safetensors")
    assert deltas and all(isinstance(d, Delta) for d in deltas.values())
    in_process = subtune.read_deltas(root / method_id, base=make_tiny(0))
    assert in_process.keys() == deltas.keys()
    assert all(torch.equal(in_process[k].to_dense(), deltas[k].to_dense()) for k in deltas)
    base = subtune.merge_deltas(make_tiny(0), deltas)
    assert type(base).__name__ == "LlamaForCausalLM" and not hasattr(base, "subtune_state")
    torch.testing.assert_close(logits(base, batch), trained[method_id], atol=1e-5, rtol=0)
