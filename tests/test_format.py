"""The adapter format, version 2 (docs/FORMAT.md): what the files hold, that another tool can read them with the
documented reader, base-changing adapters read against a base, merge_deltas, and the version policy. The bad-input
rows at the end feed docs/RELIABILITY.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, perturb_trainable
from method_cases import CASES
from reliability import Case, cases_param, check_case
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import subtune
from subtune.core import io
from subtune.core.deltas import Delta, DeltaError
from subtune.core.errors import AdapterLoadError, ExportError, SubtuneError

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(123))
BATCH = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS.clone()}
KIND_ROWS = {"columns": "s2ft", "rows": "s2ft", "blocks": "smt-mlp-ragged", "lowrank": "lamda-identity-residual",
             "sparse": "senszo", "dense": "dora"}  # a CASES row that writes each kind


def prepared(row: str = "s2ft", config=None, seed: int = 0, **kwargs):
    model = subtune.prepare(make_tiny(seed, **kwargs), config or CASES[row]["config"](), calibration=[BATCH] * 3)
    perturb_trainable(model)
    return model


def saved(directory: Path, row: str = "s2ft", config=None) -> Path:
    subtune.save(prepared(row, config), directory)
    return directory


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits


def edit_config(directory: Path, change) -> None:
    path = directory / "adapter_config.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def edit_file(directory: Path, change_tensors=None, change_table=None) -> None:
    """Rewrite adapter.safetensors (tensors and/or the header's delta table) with a valid checksum."""
    path = directory / "adapter.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    if change_tensors:
        change_tensors(tensors)
    if change_table:
        table = json.loads(metadata["subtune.deltas"])
        change_table(table)
        metadata["subtune.deltas"] = json.dumps(table)
    save_file(tensors, str(path), metadata=metadata)
    edit_config(directory, lambda cfg: cfg.update(adapter_sha256=io.sha256_file(path)))


# ------------------------------------------------------------------------------------------------- the files

def test_an_adapter_holds_its_deltas_selection_and_state_in_three_namespaces_with_the_table_in_the_header(tmp_path):
    model = prepared("lamda-identity-residual")
    subtune.save(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["base_changed"] is False
    with safe_open(str(tmp_path / "adapter.safetensors"), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert list(metadata) == ["subtune.deltas"]  # one key: safetensors writes several in a random order
    table = json.loads(metadata["subtune.deltas"])
    layers = [n for n, m in model.named_modules() if type(m).__name__ == "LowDimLinear"]
    assert sorted(table) == sorted(layers) and {row["kind"] for row in table.values()} == {"lowrank"}
    assert all(row["scale"] == 16.0 / 4 and len(row["shape"]) == 2 for row in table.values())
    for name in layers:
        assert {f"delta.{name}.A", f"delta.{name}.B", f"selection.{name}.A", f"selection.{name}.B0",
                f"selection.{name}.S0", f"state.{name}.lora_B", f"state.{name}.lora_S", f"state.{name}.frozen"} <= keys
    assert all(k.startswith(("delta.", "selection.", "state.")) for k in keys)
    assert cfg["deltas"] == {"modules": len(layers), "kinds": {"lowrank": len(layers)},
                             "values": sum(d.num_values for d in subtune.read_deltas(tmp_path).values())}


@pytest.mark.parametrize("row", sorted(CASES))
def test_base_changed_is_written_for_the_adapters_that_replace_base_weights(row, tmp_path):
    cfg = json.loads((saved(tmp_path, row) / "adapter_config.json").read_text())
    assert cfg["base_changed"] is (CASES[row]["config"]().method in ("full", "mezo"))


def _documented_reader():
    """The reader in docs/FORMAT.md, run as written (so the document cannot drift from the format)."""
    blocks = re.findall(r"```python\n(.*?)```", FORMAT_MD.read_text(), re.S)
    source = next(b for b in blocks if "def read_dense_deltas" in b)
    assert len([line for line in source.splitlines() if line.strip()]) <= 32  # short enough to copy
    namespace: dict = {}
    exec(compile(source, str(FORMAT_MD), "exec"), namespace)
    return namespace["read_dense_deltas"]


@pytest.mark.parametrize("kind", sorted(KIND_ROWS))
def test_the_documented_plain_reader_gives_read_deltas_dense_update_for_every_kind(kind, tmp_path):
    directory = saved(tmp_path, KIND_ROWS[kind])
    plain = _documented_reader()(directory)
    deltas = subtune.read_deltas(directory)
    assert kind in {d.kind for d in deltas.values()}
    assert plain.keys() == deltas.keys()
    for name, delta in deltas.items():
        torch.testing.assert_close(plain[name], delta.to_dense(torch.float64), atol=1e-12, rtol=0)


def test_the_documented_reader_refuses_a_base_changing_adapter(tmp_path):
    with pytest.raises(AssertionError, match="against a base"):
        _documented_reader()(saved(tmp_path, "full"))


# -------------------------------------------------------------------------------------- base-changing adapters

def test_smt_with_warmup_updates_reads_back_against_the_base_as_dense_deltas_to_the_trained_logits(tmp_path):
    config = subtune.SMTConfig(block_size=8, num_blocks=4, warmup_steps=3, warmup_updates=True, warmup_lr=1e-2)
    model = prepared(config=config)
    subtune.save(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_changed"] is True
    with safe_open(str(tmp_path / "adapter.safetensors"), framework="pt") as f:
        state = {k for k in f.keys() if k.startswith("state.")}
    assert state == {f"state.{k}" for k in make_tiny(0).state_dict()}  # the warmed base, under plain names
    with pytest.raises(AdapterLoadError, match=r"'smt' adapter .* not a pure update .*warm-up.* pass base="):
        subtune.read_deltas(tmp_path)
    deltas = subtune.read_deltas(tmp_path, base=make_tiny(0))
    assert deltas["model.norm"].kind == "dense" and deltas["model.norm"].shape == (1, 32)  # a 1-D weight
    assert deltas["model.layers.0.self_attn.q_proj"].kind == "dense"  # warmed − base, plus the blocks
    merged = subtune.merge_deltas(make_tiny(0), deltas)
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=0)


def test_full_fine_tuning_reads_back_without_the_weights_it_left_unchanged(tmp_path):
    model = prepared(config=subtune.FullConfig(train_embeddings=False))
    subtune.save(model, tmp_path)
    deltas = subtune.read_deltas(tmp_path, base=make_tiny(0))
    assert "model.embed_tokens" not in deltas and "lm_head" not in deltas  # frozen: equal to the base
    assert deltas["model.layers.1.mlp.down_proj"].kind == "dense"
    torch.testing.assert_close(logits(subtune.merge_deltas(make_tiny(0), deltas)), logits(model), atol=1e-5, rtol=0)


def test_read_deltas_checks_a_given_base_even_for_a_pure_update(tmp_path):
    saved(tmp_path)
    assert subtune.read_deltas(tmp_path, base=make_tiny(0)).keys() == subtune.read_deltas(tmp_path).keys()
    with pytest.raises(AdapterLoadError, match="different base model"):
        subtune.read_deltas(tmp_path, base=make_tiny(1))


# ---------------------------------------------------------------------------------------- what a delta means

def test_senszo_on_a_4bit_base_states_its_update_against_the_full_precision_base(tmp_path):
    model = prepared(config=subtune.SensZOConfig(density=0.02, mask_source="magnitude", quantize="nf4"), hidden=64,
                     intermediate=128, heads=4, kv_heads=4)
    subtune.save(model, tmp_path)
    torch.testing.assert_close(logits(subtune.load(make_tiny(0, hidden=64, intermediate=128, heads=4, kv_heads=4),
                                                   tmp_path)), logits(model), atol=0, rtol=0)
    deltas = subtune.read_deltas(tmp_path)
    base = make_tiny(0, hidden=64, intermediate=128, heads=4, kv_heads=4)
    merged = subtune.merge_deltas(make_tiny(0, hidden=64, intermediate=128, heads=4, kv_heads=4), deltas)
    for name, layer in ((n, m) for n, m in model.named_modules() if type(m).__name__ == "DenseAndSparseLinear"):
        delta, flat = deltas[name], layer.rows * layer.in_features + layer.cols
        assert delta.kind == "sparse" and delta.values.dtype == torch.float64
        got, original = merged.get_submodule(name).weight.view(-1), base.get_submodule(name).weight.view(-1)
        assert torch.equal(got[flat], layer.values.detach())  # the trained values, exactly
        outside = torch.ones_like(got, dtype=torch.bool)
        outside[flat] = False
        assert torch.equal(got[outside], original[outside])  # the rest: the full-precision base, not NF4


def test_lamda_saves_the_frozen_columns_of_b_and_load_gives_them_back(tmp_path):
    from subtune.methods.lamda.freeze import PMBFreezer

    model = prepared("lamda")
    PMBFreezer(model, total_steps=10, freeze_steps=4).after_step(None, 2)  # half of B's 4 columns frozen
    subtune.save(model, tmp_path / "a")
    frozen = {k: v for k, v in load_file(tmp_path / "a" / "adapter.safetensors").items() if k.endswith(".frozen")}
    assert frozen and all(v.tolist() == [True, True, False, False] for v in frozen.values())
    subtune.save(subtune.load(make_tiny(0), tmp_path / "a"), tmp_path / "b")
    assert (tmp_path / "a" / "adapter.safetensors").read_bytes() == (tmp_path / "b" / "adapter.safetensors").read_bytes()


def test_dora_deltas_are_its_dense_update_and_a_merged_dora_model_is_not_read(tmp_path):
    model = prepared("dora")
    deltas = subtune.read_deltas(saved(tmp_path / "a", "dora"))
    merged = subtune.merge_deltas(make_tiny(0), deltas)
    torch.testing.assert_close(logits(merged), logits(prepared("dora")), atol=1e-5, rtol=0)
    subtune.merge(model)
    with pytest.raises(SubtuneError, match=r"unmerge\(model\) first"):
        subtune.save(model, tmp_path / "b")
    subtune.unmerge(model)
    subtune.save(model, tmp_path / "b")


def test_a_full_fine_tuning_checkpoint_linked_to_its_adapter_resumes_bit_identically(tmp_path):
    """The checkpoint's model.safetensors is the adapter file itself (a hard link), whose tensors are named
    state.<name>; the Trainer's resume still restores every weight."""
    import shutil

    from conftest import CharTokenizer
    from subtune.recipes import finetune

    records = [{"instruction": f"question {i}", "output": f"answer {i % 4}"} for i in range(16)]
    args = {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-3, "save_steps": 2, "progress": False}
    finetune(make_tiny(0), CharTokenizer(), subtune.FullConfig(), records, tmp_path / "ref", **args)
    checkpoint = tmp_path / "ref" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").stat().st_ino == (checkpoint / "adapter" / "adapter.safetensors").stat().st_ino
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoint-2")
    finetune(make_tiny(0), CharTokenizer(), subtune.FullConfig(), records, tmp_path / "resumed", resume=True, **args)
    ref, resumed = (load_file(tmp_path / run / "adapter" / "adapter.safetensors") for run in ("ref", "resumed"))
    assert ref.keys() == resumed.keys() and all(torch.equal(ref[k], resumed[k]) for k in ref)
    step2 = load_file(checkpoint / "adapter" / "adapter.safetensors")
    assert not all(torch.equal(ref[k], step2[k]) for k in ref)  # steps 3-4 did train


# ------------------------------------------------------------------------------------------------ merge_deltas

def test_merge_deltas_checks_every_path_and_shape_before_changing_a_weight():
    base, reference = make_tiny(0), make_tiny(0)
    good = Delta.columns([0, 3], torch.ones(32, 2), (32, 48))
    bad = {"model.layers.0.mlp.down_proj": good, "model.layers.0.mlp.up_proj": good}  # up_proj is (48, 32)
    with pytest.raises(DeltaError, match=r"up_proj: a columns delta of shape \(32, 48\) does not fit"):
        subtune.merge_deltas(base, bad)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), reference.state_dict().values()))
    subtune.merge_deltas(base, {"model.layers.0.mlp.down_proj": good})
    weight = base.model.layers[0].mlp.down_proj.weight
    assert torch.equal(weight[:, [0, 3]], reference.model.layers[0].mlp.down_proj.weight[:, [0, 3]] + 1)


# -------------------------------------------------------------------------------------------- version policy

def test_a_format_1_adapter_is_refused_by_load_read_deltas_and_the_serve_store(tmp_path):
    from subtune.serve import AdapterStore

    saved(tmp_path)
    edit_config(tmp_path, lambda c: c.update(format_version=1, subtune_version="0.1.0"))
    message = r"written by subtune 0\.1\.0 in format 1: load it with subtune 0\.1\.x, or re-train"
    for read in (lambda: subtune.load(make_tiny(0), tmp_path), lambda: subtune.read_deltas(tmp_path),
                 lambda: AdapterStore(make_tiny(0)).add("a", tmp_path)):
        with pytest.raises(AdapterLoadError, match=message):
            read()


# ------------------------------------------------------------------------------------------- the bad-input catalogue

def _load(tmp):
    return subtune.load(make_tiny(0), tmp / "a")


def _setup(row: str = "s2ft", config_change=None, tensors=None, table=None):
    def setup(tmp):
        saved(tmp / "a", row)
        if config_change:
            edit_config(tmp / "a", config_change)
        if tensors or table:
            edit_file(tmp / "a", tensors, table)
    return setup


def _first(tensors: dict, prefix: str) -> str:
    return next(k for k in sorted(tensors) if k.startswith(prefix))


COPIED = ("model.layers.0.mlp.down_proj", "model.layers.7.mlp.down_proj")  # a LaMDA target -> a module not chosen


def _copy_row(table: dict) -> None:
    table[COPIED[1]] = table[COPIED[0]]


def _copy_tensors(tensors: dict) -> None:
    for key in [k for k in tensors if k.startswith(f"delta.{COPIED[0]}.")]:
        tensors[key.replace(COPIED[0], COPIED[1])] = tensors[key].clone()


def _reorder_widest_index(tensors: dict) -> None:
    key = max((k for k in tensors if k.startswith("delta.") and k.endswith(".index")), key=lambda k: tensors[k].numel())
    tensors[key] = tensors[key].flip(0).contiguous()


CATALOGUE = [
    Case("load-format-1", _load, AdapterLoadError, ("subtune 0.1.0 in format 1", "subtune 0.1.x", "re-train"),
         setup=_setup(config_change=lambda c: c.update(format_version=1, subtune_version="0.1.0")),
         tries="load an adapter written by subtune 0.1.0 (format 1)", before="new"),
    Case("load-format-version-missing", _load, AdapterLoadError, ("in format 1", "subtune 0.1.x"),
         setup=_setup(config_change=lambda c: c.pop("format_version")),
         tries="an `adapter_config.json` without `format_version` (written before the field existed)",
         before="new"),
    Case("load-format-version-zero", _load, AdapterLoadError, ("format_version 0", "re-save"),
         setup=_setup(config_change=lambda c: c.update(format_version=0)), tries="`format_version` 0",
         before="new"),
    Case("load-base-changed-not-a-bool", _load, AdapterLoadError, ("'base_changed' must be a json bool",),
         setup=_setup(config_change=lambda c: c.update(base_changed="no")), tries="`\"base_changed\": \"no\"`",
         before="new"),
    Case("load-base-changed-flipped", _load, AdapterLoadError, ("base_changed is true", "re-save"),
         setup=_setup(config_change=lambda c: c.update(base_changed=True)),
         tries="`base_changed` edited to true on an S²FT adapter", before="new"),
    Case("load-foreign-tensor", _load, AdapterLoadError, ("'extra.x'", "outside", "re-save"),
         setup=_setup(tensors=lambda t: t.__setitem__("extra.x", torch.zeros(2))),
         tries="a tensor outside the `delta.` / `selection.` / `state.` namespaces", before="new"),
    Case("load-delta-table-missing", _load, AdapterLoadError, ("no delta table", "re-save"),
         setup=lambda tmp: (saved(tmp / "a"), _strip_header(tmp / "a")) and None,
         tries="`adapter.safetensors` whose header lost its delta table", before="new"),
    Case("load-delta-for-an-unselected-module", _load, AdapterLoadError, ("has no place for", "re-save"),
         setup=_setup("lamda", table=_copy_row, tensors=_copy_tensors),
         tries="a delta for a module the selection did not choose", before="new"),
    Case("load-delta-kind-changed", _load, AdapterLoadError, ("the delta of", "needs", "re-save"),
         setup=_setup("lamda", table=lambda t: next(iter(t.values())).update(scale=99.0)),
         tries="a LaMDA delta whose scale was edited in the table", before="new"),
    Case("load-s2ft-delta-other-columns", _load, AdapterLoadError, ("does not fit the layer", "re-save"),
         setup=_setup(tensors=_reorder_widest_index),
         tries="an S²FT delta whose columns differ from its selection", before="new"),
    Case("load-lamda-state-missing", _load, AdapterLoadError, ("lacks tensor state.", "re-save"),
         setup=_setup("lamda", tensors=lambda t: t.pop(_first(t, "state."))),
         tries="a LaMDA adapter missing B (training state)", before="new"),
    Case("read-deltas-base-changed-without-base", lambda tmp: subtune.read_deltas(tmp / "a"), AdapterLoadError,
         ("'full' adapter", "not a pure update", "pass base="), setup=_setup("full"),
         tries="`read_deltas` of a full fine-tuning adapter without `base=`", before="new"),
    Case("read-deltas-wrong-base", lambda tmp: subtune.read_deltas(tmp / "a", base=make_tiny(1)), AdapterLoadError,
         ("different base model",), setup=_setup("full"), tries="`read_deltas(dir, base=)` with another base",
         before="new"),
    Case("read-deltas-prepared-base", lambda tmp: subtune.read_deltas(tmp / "a", base=_prepared_base()),
         AdapterLoadError, ("plain base model", "freshly loaded base"), setup=_setup("mezo"),
         tries="`read_deltas(dir, base=)` with a base that has an S²FT method attached", before="new"),
    Case("read-deltas-not-a-directory-path", lambda tmp: subtune.read_deltas(42), AdapterLoadError,
         ("read_deltas() needs a directory path",), tries="`read_deltas(42)`", before="new"),
    Case("merge-deltas-unknown-module", lambda tmp: subtune.merge_deltas(make_tiny(0), {"model.nope": _delta()}),
         DeltaError, ("no module 'model.nope'", "base model they were made for"),
         tries="`merge_deltas` with a module path the model lacks", before="new"),
    Case("merge-deltas-wrong-shape", lambda tmp: subtune.merge_deltas(make_tiny(0), {"lm_head": _delta()}),
         DeltaError, ("does not fit its weight", "base model they were made for"),
         tries="`merge_deltas` with a delta of another shape", before="new"),
    Case("merge-deltas-into-a-prepared-model",
         lambda tmp: subtune.merge_deltas(_prepared_base(), {"model.layers.0.mlp.down_proj": _delta()}),
         SubtuneError, ("adapter layers attached", "subtune.merge(model)"),
         tries="`merge_deltas` into a model with a method attached", before="new"),
    Case("merge-deltas-not-a-delta", lambda tmp: subtune.merge_deltas(make_tiny(0), {"lm_head": torch.zeros(2)}),
         DeltaError, ("expected a delta",), tries="`merge_deltas` given a tensor instead of a Delta", before="new"),
    Case("export-base-changed-adapter", lambda tmp: subtune.export_lora(prepared("mezo"), tmp / "lora"), ExportError,
         ("not a pure update", "merged model"), tries="`export_lora` of a MeZO (absolute weights) adapter",
         before="clear"),
]


def _delta() -> Delta:
    return Delta.columns([0, 3], torch.ones(32, 2), (32, 48))


def _prepared_base():
    return subtune.prepare(make_tiny(0), subtune.S2FTConfig(d_ratio=0.1))


def _strip_header(directory: Path) -> None:
    path = directory / "adapter.safetensors"
    save_file(load_file(str(path)), str(path))
    edit_config(directory, lambda cfg: cfg.update(adapter_sha256=io.sha256_file(path)))


@cases_param(CATALOGUE)
def test_catalogue_format(case, tmp_path):
    check_case(case, tmp_path)
