"""The explicit method protocol (issue 11): everything the core, trainers, bench, demo and CLI need from a method is
a declared member of `Method` with a default; nothing outside `methods/` probes a method with getattr or names one
by its id; the core imports no method code; one error hierarchy; the thin CLI's library calls."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import subtune
from conftest import make_tiny, perturb_trainable
from reliability import Case, cases_param, check_case
from subtune.core.config import ConfigError
from subtune.core.errors import AdapterExistsError, RegistrationError, SelectionError, SubtuneError
from subtune.core.method import Method, Selection, available_methods, get_method, registered_methods

SRC = Path(subtune.__file__).resolve().parent
CORE = SRC / "core"
METHODS = SRC / "methods"

# String literals equal to a method id that are not method ids: (file relative to src/subtune, literal, why).
NOT_METHOD_IDS = {("cli.py", "lora"): "`export --format lora`: the PEFT LoRA file format, compared with --format only"}
NOT_METHOD_IDS.update({(f, c): "`subtune repro` claim names (one per paper), not method lookups"
                       for c in ("s2ft", "smt", "lamda", "senszo") for f in ("repro/__init__.py", f"repro/{c}.py")})


def _sources(root: Path, skip: Path | None = None) -> list[Path]:
    return [p for p in sorted(root.rglob("*.py")) if skip is None or skip not in p.parents]


def _names_in(node: ast.AST) -> set[str]:
    """Every identifier and attribute name in an expression (`state.method` -> {"state", "method"})."""
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def _is_method_object(node: ast.AST) -> bool:
    """`method`, `state.method`, `self.method`, `get_method(...)`, `lora_method`: an expression naming a method."""
    return any(n == "method" or n.endswith("_method") or n == "get_method" for n in _names_in(node))


def _rel(path: Path) -> str:
    return str(path.relative_to(SRC)) if SRC in path.parents else path.name


def probing_calls(path: Path) -> list[str]:
    """`getattr(<method>, ...)` / `hasattr(<method>, ...)` in one file, as 'file:line: source'."""
    tree = ast.parse(path.read_text())
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                and node.args and _is_method_object(node.args[0]):
            hits.append(f"{_rel(path)}:{node.lineno}: {ast.unparse(node)}")
    return hits


def method_id_literals(path: Path, ids: set[str]) -> list[str]:
    """String constants that are a method id (alone, or as `id@variant` / `floor:...+id`), as 'file:line: value'."""
    rel = _rel(path)
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            bare = node.value.rpartition("+")[2].partition("@")[0]
            if bare in ids and (rel, bare) not in NOT_METHOD_IDS:
                hits.append(f"{rel}:{node.lineno}: {node.value!r}")
    return hits


def test_no_getattr_or_hasattr_probes_a_method_object_anywhere():
    hits = [h for p in _sources(SRC) for h in probing_calls(p)]
    assert not hits, "declare the member on core/method.py's Method instead of probing for it:\n" + "\n".join(hits)


def test_no_method_id_is_named_outside_methods():
    ids = set(available_methods())
    assert {"full", "lora", "senszo", "mezo", "lamda++"} <= ids
    hits = [h for p in _sources(SRC, skip=METHODS) for h in method_id_literals(p, ids)]
    assert not hits, "ask the method's declared members instead of naming its id:\n" + "\n".join(hits)


def test_the_scanners_find_what_they_look_for(tmp_path):
    """The two scans above would catch a probe and an id (so their passing means something)."""
    bad = tmp_path / "probe_example.py"
    bad.write_text('def f(state, m, method_config):\n    x = getattr(state.method, "zeroth_order", False)\n'
                   '    y = hasattr(get_method(m), "benchmark_step") or getattr(method_config, "eps")\n'
                   '    return m == "mezo" or m == "lamda@b_frozen" or m == "mezo-like"\n')
    assert len(probing_calls(bad)) == 2  # not the config's getattr
    assert len(method_id_literals(bad, set(available_methods()))) == 2


def test_no_methods_module_inside_the_core_source():
    """No import of subtune.methods (nor of the package root, which imports them) anywhere in core/, not even
    inside a function: the core reaches methods only through the registry."""
    hits = []
    for path in _sources(CORE):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            hits += [f"{path.relative_to(SRC)}:{node.lineno}: {n}" for n in names
                     if n == "subtune" or n.startswith("subtune.methods")]
    assert not hits, hits


IMPORT_EACH_ALONE = r"""
import importlib, json, sys, types
# the package root without its __init__ (which registers the methods): what a core module imports by itself
root = types.ModuleType("subtune"); root.__path__ = [sys.argv[1]]
out = {}
for name in json.loads(sys.argv[2]):
    for m in [m for m in sys.modules if m == "subtune" or m.startswith("subtune.")]:
        del sys.modules[m]
    sys.modules["subtune"] = root
    importlib.import_module(name)
    out[name] = sorted(m for m in sys.modules if m.startswith("subtune.") and not m.startswith("subtune.core"))
print(json.dumps(out))
"""


def test_each_core_module_imports_alone_and_pulls_in_nothing_above_the_core():
    """Each module of subtune.core, imported alone (every subtune module dropped from sys.modules before it) in a
    fresh interpreter, imports no subtune.methods module, nor anything else outside subtune.core."""
    modules = sorted("subtune." + ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
                     for p in _sources(CORE))
    assert "subtune.core.api" in modules and "subtune.core.method" in modules and len(modules) >= 15
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, str(SRC), json.dumps(modules)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pulled = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(pulled) == set(modules)
    assert {name: extra for name, extra in pulled.items() if extra} == {}


def test_the_package_root_registers_every_builtin_method_folder():
    """The package root imports subtune.methods (in the loader it hands the registry, which runs it before the
    first lookup: Python runs the root before any submodule, so a program importing only the core still finds
    every method), and every method folder registered its methods."""
    root = ast.parse((SRC / "__init__.py").read_text())
    assert any(isinstance(n, ast.Import) and any(a.name == "subtune.methods" for a in n.names)
               for n in ast.walk(root))
    folders = {p.parent.name for p in METHODS.glob("*/method.py")}
    registered = {type(m).__module__.split(".")[2] for m in registered_methods()}
    assert folders == registered == {"full", "lora", "s2ft", "smt", "lamda", "senszo"}


# -------------------------------------------------------------------------------------------- the declared members

class _Bare(Method):
    """A method declaring nothing but what it must: every other member takes Method's default."""

    id = "bare-test"

    def attach(self, model, config, selection):
        pass

    def deltas(self, model, state):
        return {}

    def restore(self, model, state, deltas, training_state):
        pass


def test_method_defaults():
    from transformers import Trainer

    bare, config, model = _Bare(), subtune.MethodConfig(), make_tiny(0)
    assert (bare.zeroth_order, bare.exact_restore, bare.own_base_floor, bare.bench_reference, bare.demo) == \
        (False, True, False, None, None)
    assert bare.objective(config) == "lm" and bare.calibration_source(config) == "train"
    assert bare.calibration_batches(config) == 0 and bare.modifies_base(config) is False
    assert bare.callbacks(model, None) == [] and bare.trainer_class() is Trainer
    assert bare.training_state(model, None) == {} and bare.base_changed(None) is False
    assert isinstance(bare.select(model, config, None), Selection)
    with pytest.raises(SubtuneError, match="not zeroth-order"):
        bare.zo_tensors(model, None)
    with pytest.raises(ConfigError, match="no benchmark variant 'x'"):
        bare.benchmark_variant(model, "x")


def test_every_member_the_callers_use_is_declared_on_method():
    """The members the trainers, bench, demo and core read are Method's own (with defaults), so no caller needs a
    getattr default; a method overrides them, never adds them."""
    used = {"zeroth_order", "exact_restore", "own_base_floor", "bench_reference", "demo", "objective",
            "calibration_source", "calibration_batches", "zo_tensors", "callbacks", "trainer_class",
            "config_for_budget", "benchmark_variant", "default_lr", "paper", "select", "attach", "deltas",
            "training_state", "restore", "base_changed", "modifies_base", "merge", "unmerge", "unload"}
    assert used <= set(vars(Method)), used - set(vars(Method))
    assert not hasattr(Method, "benchmark_step")  # replaced by the shared train/zo.zo_step


def test_builtin_methods_declare_their_members():
    senszo, mezo, full, lora, dora = (get_method(i) for i in ("senszo", "mezo", "full", "lora", "dora"))
    assert senszo.zeroth_order and mezo.zeroth_order and not full.zeroth_order and not lora.zeroth_order
    assert senszo.exact_restore and not mezo.exact_restore
    assert senszo.own_base_floor and not mezo.own_base_floor
    assert (full.bench_reference, lora.bench_reference, dora.bench_reference, mezo.bench_reference) == \
        ("full", "LoRA", None, None)  # MeZO subclasses full fine-tuning but is no reference
    assert senszo.calibration_source(subtune.SensZOConfig()) == "corpus"
    assert senszo.calibration_source(subtune.SensZOConfig(calibration_source="train")) == "train"
    assert get_method("smt").calibration_source(subtune.SMTConfig()) == "train"
    assert mezo.objective(subtune.MeZOConfig(objective="choice")) == "choice"
    assert senszo.objective(subtune.SensZOConfig()) == "auto" and lora.objective(subtune.LoraConfig()) == "lm"


def test_the_demo_keeps_its_rows_and_settings():
    from subtune.recipes import demo_methods

    settings = demo_methods()
    # the zeroth-order methods are left out (issue 15: `subtune repro senszo` measures them)
    assert list(settings) == ["full", "lora", "dora", "s2ft", "smt", "lamda", "lamda++"]
    assert settings["lamda++"] == {"lr": 2e-2, "config": {"r": 16, "rank_min": 8, "rank_max": 64}}
    assert settings["full"] == {"lr": 3e-4}
    settings["full"]["lr"] = 1.0  # a copy: the method's own settings stay
    assert get_method("full").demo == {"lr": 3e-4}


def test_a_method_gets_the_state_as_an_argument():
    """LaMDA's callbacks read the config from the state they are given, not from the model."""
    model = subtune.prepare(make_tiny(0), subtune.LaMDAConfig(r=4))
    state = copy.copy(model.subtune_state)
    del model.subtune_state  # a method that read it off the model would fail here
    (callback,) = state.method.callbacks(model, state)
    assert callback.config is state.config


def test_zo_step_is_spsa_over_the_declared_members(batch):
    """The step the trainer and the bench share equals spsa_step run by hand on the method's declared tensors,
    eps, restore mode and objective (MeZO's choice loss too)."""
    from subtune.ops.zo import spsa_step
    from subtune.train.zo import choice_loss, fp32_lm_loss, zo_step

    for config, loss, data in [
        (subtune.SensZOConfig(density=0.05, quantize="none", mask_source="magnitude", eps=1e-2), fp32_lm_loss, batch),
        (subtune.MeZOConfig(objective="choice", eps=1e-2), choice_loss,
         {**batch, "choice_counts": torch.tensor([2]), "gold": torch.tensor([1])}),
    ]:
        a, b = (subtune.prepare(make_tiny(3), copy.deepcopy(config)) for _ in range(2))
        out = zo_step(a, a.subtune_state, data, 1e-2, [4, 5])
        state = b.subtune_state
        with torch.inference_mode():
            ref = spsa_step(state.method.zo_tensors(b, state), lambda: loss(b, data), [4, 5], config.eps, 1e-2,
                            exact_restore=state.method.exact_restore)
        assert out["projected_grads"] == ref["projected_grads"] and out["loss"] == ref["loss"]
        for x, y in zip(a.subtune_state.method.zo_tensors(a, a.subtune_state), state.method.zo_tensors(b, state)):
            assert torch.equal(x, y)


def test_trainable_summary_reads_zeroth_order_from_the_method():
    summary = subtune.trainable_summary(subtune.prepare(make_tiny(0), subtune.SensZOConfig(
        density=0.05, quantize="none", mask_source="magnitude")))
    assert summary.trainable > 0 and summary.optimizer_state_bytes == 0 and summary.gradient_bytes == 0
    lora = subtune.trainable_summary(subtune.prepare(make_tiny(0), subtune.LoraConfig(r=2)))
    assert lora.optimizer_state_bytes == 8 * lora.trainable


# ----------------------------------------------------------------------------------------------------- the bench

def _fake_result(kind: str) -> dict:
    t = 0.1 + 0.01 * len(kind)
    return {"kind": kind, "trainable": 7, "median_s": t, "min_s": t, "max_s": t, "tokens_per_s": 1 / t,
            "peak_mib": 10 * t, "total_peak_mib": 100 * t}


def test_the_bench_plans_floors_and_references_from_declared_members(monkeypatch):
    """Which floors run and which rows the ratio columns divide by come from zeroth_order / own_base_floor /
    bench_reference (the same kinds and table as when they were chosen by id), and a new method that declares
    them gets the same treatment."""
    from subtune.bench import harness
    from subtune.core import method as registry

    monkeypatch.setattr(harness, "run_one", lambda spec, kind: _fake_result(kind))
    spec = harness.BenchSpec(methods=["full", "lora", "senszo", "mezo"], preset="tiny", budget=100)
    report = harness.run_bench(spec, progress=False)
    assert [r["kind"] for r in report["results"]] == [
        "full", "lora", "senszo", "mezo", "floor:inference", "floor:frozen_backward", "floor:zo_two_forwards",
        "floor:inference+senszo", "floor:zo_two_forwards+senszo"]
    table = harness.markdown_table(report)
    assert "| total peak (MiB) | time vs full | mem vs full | time vs LoRA | mem vs LoRA | time vs floor | " \
           "mem vs floor |" in table
    full, lora = (next(r for r in report["results"] if r["kind"] == k) for k in ("full", "lora"))
    senszo_row = next(line for line in table.splitlines() if line.startswith("| senszo |"))
    assert f"{_fake_result('senszo')['median_s'] / full['median_s']:.2f}×" in senszo_row
    assert f"{_fake_result('senszo')['median_s'] / lora['median_s']:.2f}×" in senszo_row
    assert "`senszo` step vs inference on the same base" in table

    class Quantised(type(get_method("senszo"))):
        id, bench_reference = "zo-test", "ZO"

    monkeypatch.setitem(registry._REGISTRY, "zo-test", Quantised())
    report = harness.run_bench(harness.BenchSpec(methods=["zo-test", "s2ft"], preset="tiny", budget=100),
                               progress=False)
    assert [r["kind"] for r in report["results"]][-3:] == [
        "floor:zo_two_forwards", "floor:inference+zo-test", "floor:zo_two_forwards+zo-test"]
    assert "time vs ZO | mem vs ZO |" in harness.markdown_table(report)


# ------------------------------------------------------------------------------------------------------- errors

def test_layers_refuse_a_bad_selection_with_a_selection_error():
    from subtune.ops.block_sparse import BlockDeltaLinear
    from subtune.ops.sliced import INPUT_COLUMNS, SlicedDeltaLinear
    from subtune.ops.sparse import DenseAndSparseLinear

    base = torch.nn.Linear(16, 8)
    for build in (lambda: SlicedDeltaLinear(base, torch.tensor([3, 3]), INPUT_COLUMNS),
                  lambda: SlicedDeltaLinear(base, torch.tensor([16]), INPUT_COLUMNS),
                  lambda: BlockDeltaLinear(base, torch.tensor([0, 0]), torch.tensor([1, 1]), 4),
                  lambda: DenseAndSparseLinear(base, torch.tensor([200])),
                  lambda: DenseAndSparseLinear(base, torch.tensor([], dtype=torch.long))):
        with pytest.raises(SelectionError, match="select again on this model") as info:
            build()
        assert isinstance(info.value, ValueError)  # still a ValueError for code that caught one


def test_the_registry_refuses_bad_registrations_with_a_subtune_error():
    with pytest.raises(RegistrationError, match="no id"):
        subtune.register_method(type("NoId", (_Bare,), {"id": ""})())
    with pytest.raises(RegistrationError, match="already registered by S2FTMethod"):
        subtune.register_method(type("Clash", (_Bare,), {"id": "s2ft"})())
    assert type(get_method("s2ft")).__name__ == "S2FTMethod"


def test_every_intentional_raise_in_src_is_a_subtune_error():
    """No bare ValueError/KeyError/RuntimeError/TypeError raised on purpose: the ones left are internal
    invariants (not user input), listed here with why."""
    allowed = {("core/config.py", "ValueError"),  # caught two lines below and re-raised as ConfigError
               ("zoo/world.py", "ValueError")}  # the synthetic world's own question kinds: an internal bug
    hits = []
    for path in _sources(SRC):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = call.id if isinstance(call, ast.Name) else ""
                rel = str(path.relative_to(SRC))
                if name in ("ValueError", "KeyError", "RuntimeError", "TypeError") and (rel, name) not in allowed:
                    hits.append(f"{rel}:{node.lineno}: {name}")
    assert hits == []


def test_loading_an_adapter_whose_selection_a_layer_refuses_is_an_adapter_load_error(tmp_path):
    """A SelectionError from a layer during load names the adapter (AdapterLoadError), like every load failure."""
    from safetensors.torch import load_file, save_file

    from subtune.core import io

    model = subtune.prepare(make_tiny(0), subtune.S2FTConfig(o_ratio=0.5, d_ratio=0.1))
    directory = subtune.save(model, tmp_path / "a")
    path = directory / "adapter.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if k.startswith("selection.") and k.endswith("o_proj"))
    tensors[key] = tensors[key].clone()
    tensors[key][1] = tensors[key][0]  # the same head twice
    save_file(tensors, str(path), metadata=metadata)
    cfg = json.loads((directory / "adapter_config.json").read_text())
    cfg["adapter_sha256"] = io.sha256_file(path)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(subtune.AdapterLoadError, match="selection does not fit this model") as info:
        subtune.load(make_tiny(0), directory)
    assert isinstance(info.value.__cause__, SelectionError)


# ------------------------------------------------------------------------------------------- thin CLI, libraries

def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_merged_writes_a_plain_hf_model_equal_to_the_trained_one(tmp_path):
    from transformers import LlamaForCausalLM

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    for case, config in [("s2ft", subtune.S2FTConfig(o_ratio=0.25, d_ratio=0.1)), ("full", subtune.FullConfig())]:
        model = subtune.prepare(make_tiny(0), config)
        perturb_trainable(model)
        trained = _logits(model, ids)
        out = subtune.export_merged(model, tmp_path / case)
        assert not hasattr(model, "subtune_state")  # unloaded: the plain merged model
        torch.testing.assert_close(_logits(LlamaForCausalLM.from_pretrained(out), ids), trained, atol=1e-5, rtol=0)
        assert not (out / "adapter_config.json").exists()


def _adapter_dir(tmp: Path) -> Path:
    return subtune.save(subtune.prepare(make_tiny(0), subtune.S2FTConfig(o_ratio=0.25)), tmp / "out")


def test_export_merged_replaces_an_adapter_only_when_asked(tmp_path):
    target = _adapter_dir(tmp_path)
    model = subtune.prepare(make_tiny(0), subtune.S2FTConfig(o_ratio=0.25))
    subtune.export_merged(model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_build_mask_writes_what_the_old_cli_pipeline_wrote(tmp_path):
    """`subtune senszo-mask` is one library call now; the mask equals the one the inline code computed."""
    from safetensors.torch import load_file

    from subtune.core.surgery import find_targets
    from subtune.methods.senszo import build_mask, compute_mask, save_mask

    config = subtune.SensZOConfig(density=0.05, calibration_samples=2, calibration_source="train")
    records = [{"instruction": f"say {i}", "input": "", "output": f"value {i % 3}"} for i in range(4)]
    from conftest import CharTokenizer

    model = make_tiny(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = build_mask(model, config, tmp_path / "new.safetensors", CharTokenizer(), records)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is left as it was

    from subtune.data.loaders import calibration_batches

    targets = find_targets(model, config.target_modules)
    old = compute_mask(model, targets, config, calibration_batches(CharTokenizer(), records, batch_size=1,
                                                                   num_batches=2))
    save_mask(old, tmp_path / "old.safetensors", {n: tuple(m.weight.shape) for n, m in targets.items()})
    new, ref = load_file(str(tmp_path / "new.safetensors")), load_file(str(tmp_path / "old.safetensors"))
    assert new.keys() == ref.keys() and all(torch.equal(new[k], ref[k]) for k in new)
    assert summary.selected == sum(v.numel() for v in ref.values()) and summary.matrices == len(ref)
    assert summary.total == sum(m.weight.numel() for m in targets.values())


CATALOGUE = [
    Case("export-merged-over-adapter",
         lambda tmp: subtune.export_merged(subtune.prepare(make_tiny(0), subtune.S2FTConfig(o_ratio=0.25)),
                                           tmp / "out"),
         AdapterExistsError, ("holds a subtune adapter", "merged export", "overwrite=True"), setup=_adapter_dir,
         tries="a merged export into a directory holding a subtune adapter",
         before="silent: `subtune export --format merged` wrote the model into the adapter's directory, beside it"),
    Case("build-mask-with-mask-path",
         lambda tmp: subtune.methods.senszo.build_mask(make_tiny(0), subtune.SensZOConfig(mask_path=str(tmp / "m")),
                                                       tmp / "new.safetensors"),
         ConfigError, ("mask_path is set", "drop mask_path"),
         tries="`build_mask` with a config whose mask_path names a mask to reuse", before="new"),
    Case("register-method-without-id", lambda tmp: subtune.register_method(type("NoId", (_Bare,), {"id": ""})()),
         RegistrationError, ("no id", "non-empty string"),
         tries="`register_method` of a method class with an empty id", before="raw: a bare ValueError"),
    Case("layer-repeated-index",
         lambda tmp: __import__("subtune.ops.sliced", fromlist=["x"]).SlicedDeltaLinear(
             torch.nn.Linear(8, 4), torch.tensor([1, 1]), "input_columns"),
         SelectionError, ("distinct", "select again"),
         tries="a training layer given a repeated column index", before="raw: a bare ValueError"),
    Case("bench-unknown-variant",
         lambda tmp: get_method("s2ft").benchmark_variant(make_tiny(0), "b_frozen"),
         ConfigError, ("no benchmark variant 'b_frozen'", "drop '@b_frozen'"),
         tries="`subtune bench --methods s2ft@b_frozen`: a phase the method does not have",
         before="raw: a bare ValueError in the run's error column"),
]


@cases_param(CATALOGUE)
def test_catalogue_protocol(case, tmp_path):
    check_case(case, tmp_path)


def test_cli_merged_export_and_senszo_mask_are_the_library_calls(tmp_path):
    """`subtune export --format merged` writes what `export_merged` does (a model equal to the trained one), and
    `subtune senszo-mask` the mask `build_mask` computes, on the embedded default model."""
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from subtune.cli import main
    from subtune.methods.senszo import build_mask
    from subtune.zoo import load_model

    model, tokenizer = load_model("default")
    subtune.prepare(model, subtune.S2FTConfig(o_ratio=0.1, d_ratio=0.05))
    perturb_trainable(model, scale=0.02)
    subtune.save(model, tmp_path / "adapter")
    ids = torch.tensor([tokenizer("Where does Ann live?").input_ids])
    trained = _logits(model, ids)

    run = CliRunner().invoke(main, ["export", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m"),
                                    "--format", "merged"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    torch.testing.assert_close(_logits(LlamaForCausalLM.from_pretrained(tmp_path / "m"), ids), trained, atol=1e-5,
                               rtol=0)
    assert (tmp_path / "m" / "tokenizer_config.json").is_file()

    run = CliRunner().invoke(main, ["senszo-mask", "--out", str(tmp_path / "cli.safetensors"), "--samples", "2",
                                    "--seq", "16", "--density", "0.01"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    base, _ = load_model("default")
    summary = build_mask(base, subtune.SensZOConfig(density=0.01, calibration_samples=2), tmp_path / "lib.safetensors",
                         tokenizer, seq=16)
    cli, lib = load_file(str(tmp_path / "cli.safetensors")), load_file(str(tmp_path / "lib.safetensors"))
    assert cli.keys() == lib.keys() and all(torch.equal(cli[k], lib[k]) for k in cli)
    assert f"mask: {summary.selected:,} of {summary.total:,} weights (1.000%) over {summary.matrices} matrices" \
        in run.output
