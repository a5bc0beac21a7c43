"""The serving room (issue #12, items 1-4): an AdapterStore of deltas beside one shared base.

References: the trained (prepared) models themselves, each adapter merged alone into the base, the untouched base
(bit for bit), and deltas merged by hand. Deltas come from real method layers: each method is prepared on a copy of
the base, its trainable values moved (`perturb_trainable`), and its update read from the layers (`as_delta()`;
LoRA from PEFT's factors; SensZOQ as sparse(values − original entries)).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
from conftest import make_tiny, perturb_trainable
from method_cases import CASES
from peft.tuners.lora import LoraLayer
from transformers import StoppingCriteria, StoppingCriteriaList

import subtune
from reliability import Case, cases_param, check_case
from subtune.core import api
from subtune.core.deltas import Delta, read_delta_file, write_delta_file
from subtune.core.errors import NonFiniteError
from subtune.core.fingerprint import fingerprint as base_fingerprint
from subtune.ops.base import WrappedLinear
from subtune.ops.sparse import DenseAndSparseLinear
from subtune.serve import (
    AdapterActiveError, AdapterMismatchError, AdapterNameError, AdapterStore, DuplicateAdapterError, RoutingError,
    ServeError, UnknownAdapterError, WrongBaseError,
)

METHODS = ["s2ft", "smt", "lamda", "senszo", "lora"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SUPPORT_KINDS = {"columns", "rows", "blocks", "sparse"}


def calibration():
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(123))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return [batch, batch]


def ids(rows: int, seq: int = 9, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 64, (rows, seq), generator=torch.Generator().manual_seed(seed))


def layer_deltas(model, base) -> dict[str, Delta]:
    """{module path: Delta} read from a prepared model's layers, in the plain base's coordinates."""
    base_modules = dict(base.named_modules())
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, DenseAndSparseLinear):  # SensZOQ: values are absolute W entries
            weight = base_modules[path].weight.detach()
            flat = module.rows * module.in_features + module.cols
            out[path] = Delta.sparse(flat, module.values.detach() - weight.reshape(-1)[flat].float(),
                                     tuple(weight.shape))
        elif isinstance(module, WrappedLinear):
            out[path] = module.as_delta()
        elif isinstance(module, LoraLayer):
            out[path] = Delta.lowrank(module.lora_A["default"].weight.detach(),
                                      module.lora_B["default"].weight.detach(), module.scaling["default"])
    assert out, "the prepared model has no adapter layers"
    return out


@functools.lru_cache(maxsize=None)
def trained(method: str, dtype_name: str = "fp32", base_seed: int = 0, config_seed: int = 0):
    """(prepared model, its deltas): a method trained (perturbed) on a copy of make_tiny(base_seed)."""
    base = make_tiny(base_seed, dtype=DTYPES[dtype_name])
    config = CASES[method]["config"]()
    config.seed = config_seed
    model = subtune.prepare(copy.deepcopy(base), config, calibration=calibration())
    perturb_trainable(model, seed=7 + config_seed)
    return model, layer_deltas(model, base)


def store_with(methods=METHODS, dtype_name="fp32") -> AdapterStore:
    store = AdapterStore(make_tiny(0, dtype=DTYPES[dtype_name]))
    for method in methods:
        store.add_deltas(method, trained(method, dtype_name)[1], info={"method": method})
    return store


def bits(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().view(torch.uint8) for k, v in model.state_dict().items()}


def same_bits(model, snapshot) -> bool:
    now = bits(model)
    return now.keys() == snapshot.keys() and all(torch.equal(now[k], snapshot[k]) for k in now)


def hooks_left(model) -> list[str]:
    return [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


@torch.no_grad()
def forward(model, input_ids, attention_mask=None):
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


# ------------------------------------------------------------------------------------------ store and switch
@pytest.mark.parametrize("method", METHODS)
def test_an_activated_adapter_is_the_trained_model(method):
    """Merged by scatter (activate) and routed (logits) alike, the adapter computes what its training layers did."""
    model, _ = trained(method)
    store = store_with([method])
    x = ids(3)
    reference = forward(model, x)
    assert not torch.allclose(reference, forward(store.model, x), atol=1e-4)  # the update is visible
    torch.testing.assert_close(store.logits(x, [method] * 3), reference, atol=1e-5, rtol=0)
    store.activate(method)
    assert store.active == method
    torch.testing.assert_close(forward(store.model, x), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_add_remove_activate_round_trips_restore_the_base_bit_for_bit(dtype_name):
    store = store_with(dtype_name=dtype_name)
    model = store.model
    base = bits(model)
    pointers = {k: p.data_ptr() for k, p in model.named_parameters()}
    store.fuse({"s2ft": 1.0, "lamda": 0.5, "senszo": 1.0}, name="fused")
    assert same_bits(model, base)  # adding and fusing never touch the base
    for name in ["s2ft", "smt", "lamda", "senszo", "lora", "fused", "s2ft", "lora", None, "smt"]:
        store.activate(name)
        assert store.active == name
        assert same_bits(model, base) == (name is None)  # a merged adapter changes the weights, None restores them
        store.activate(name)  # activating the active adapter again is a no-op
        assert same_bits(model, base) == (name is None)
    store.remove("smt")  # removing the active adapter restores the base first
    assert store.active is None and same_bits(model, base) and "smt" not in store.names()
    store.activate("lamda")
    store.activate(None)
    assert same_bits(model, base)
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == pointers  # merged in place, never replaced


def test_names_memory_and_info():
    store = store_with()
    assert store.names() == METHODS and len(store) == 5 and "lora" in store and "nope" not in store
    assert store.info("smt") == {"method": "smt"}
    for method in METHODS:
        deltas = trained(method)[1]
        assert store.memory(method) == sum(d.nbytes for d in deltas.values())
    base_bytes = sum(p.numel() * p.element_size() for p in store.model.parameters())
    assert store.memory("s2ft") < 0.1 * base_bytes  # values and indices only, never a copy of a base weight
    store.fuse({"s2ft": 1.0}, name="s2ft-again")  # weight 1 on one source: the same tensors, counted once in total
    assert store.memory("s2ft-again") == store.memory("s2ft")
    assert store.memory() == sum(store.memory(m) for m in METHODS)
    store.activate("s2ft")  # the switch keeps exactly the touched base entries, no more
    touched = sum(d.num_values for d in trained("s2ft")[1].values())
    assert store.active_saved_bytes == touched * 4
    store.activate(None)
    assert store.active_saved_bytes == 0
    store.remove("lora")
    assert store.names() == ["s2ft", "smt", "lamda", "senszo", "s2ft-again"]


def test_a_vector_parameter_merges_but_is_not_routed_per_row():
    """A 1-D parameter (a norm) takes a (1, n) dense delta: activate merges it exactly; per-row routing refuses."""
    store = AdapterStore(make_tiny(0))
    base = bits(store.model)
    norm = store.model.model.norm.weight
    update = torch.randn(1, norm.shape[0], generator=torch.Generator().manual_seed(1))
    expected = norm.detach().clone() + update[0]
    store.add_deltas("norm", {"model.norm": Delta.dense(update)})
    store.activate("norm")
    assert torch.equal(norm, expected)
    store.activate(None)
    assert same_bits(store.model, base)
    with pytest.raises(RoutingError, match="model.norm.*activate"):
        store.logits(ids(1), ["norm"])
    assert not hooks_left(store.model)


# ------------------------------------------------------------------------------------ per-request adapters
MIXED = ["s2ft", None, "smt", "lamda", "s2ft", "senszo", "lora"]  # 5 adapters (one twice) + the base


def test_a_mixed_batch_gives_each_row_its_adapter_merged_alone():
    store = store_with()
    x = ids(len(MIXED))
    base = bits(store.model)
    plain = forward(store.model, x)
    mixed = store.logits(x, MIXED)
    assert not hooks_left(store.model) and same_bits(store.model, base)
    for row, name in enumerate(MIXED):
        if name is None:  # base rows share the batch's GEMMs and get no term: bit for bit the plain model
            assert torch.equal(mixed[row], plain[row])
            continue
        store.activate(name)
        torch.testing.assert_close(mixed[row], forward(store.model, x)[row], atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed[row], forward(trained(name)[0], x)[row], atol=1e-5, rtol=0)
        store.activate(None)


def test_a_mixed_batch_generates_each_rows_greedy_tokens_with_the_kv_cache():
    """Left-padded prompts of different lengths, 3 adapters + base; greedy tokens equal each adapter merged alone."""
    store = store_with(["s2ft", "smt", "lora"])
    names = ["s2ft", None, "smt", "lora", "smt"]
    x = ids(len(names), seq=8, seed=9)
    mask = torch.ones_like(x)
    for row, pad in enumerate([0, 3, 1, 0, 5]):
        x[row, :pad], mask[row, :pad] = 0, 0
    kwargs = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    lengths = []
    probe = store.model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda module, inputs: lengths.append(inputs[0].shape[1]))
    try:
        out = store.generate(x, names, attention_mask=mask, **kwargs)
    finally:
        probe.remove()
    assert lengths[0] == x.shape[1] and set(lengths[1:]) == {1}  # prefill, then one token per step from the cache
    assert not hooks_left(store.model)
    assert out.shape[1] > x.shape[1]
    for row, name in enumerate(names):
        store.activate(name)
        alone = store.model.generate(input_ids=x, attention_mask=mask, **kwargs)
        assert torch.equal(out[row], alone[row]), f"row {row} ({name})"
        store.activate(None)


def test_beams_and_several_sequences_per_prompt_keep_their_adapter():
    """generate expands each prompt into k consecutive rows (beams, num_return_sequences); routing follows."""
    store = store_with(["s2ft", "lamda"])
    names = ["lamda", None, "s2ft"]
    x = ids(3, seq=6, seed=11)
    kwargs = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
    out = store.generate(x, names, **kwargs)
    assert out.shape[0] == 6
    for row, name in enumerate(names):
        store.activate(name)
        alone = store.model.generate(input_ids=x, **kwargs)
        assert torch.equal(out[2 * row: 2 * row + 2], alone[2 * row: 2 * row + 2]), f"prompt {row} ({name})"
        store.activate(None)


def many_slice_adapters(count: int, seed: int = 3) -> dict[str, dict[str, Delta]]:
    """`count` random S²FT-like adapters (columns on o/down, rows on v/up) of varied sizes on make_tiny's layers."""
    gen = torch.Generator().manual_seed(seed)
    model = make_tiny(0)
    shapes = {p: tuple(m.weight.shape) for p, m in model.named_modules() if p.endswith(("o_proj", "down_proj",
                                                                                         "v_proj", "up_proj"))}
    adapters = {}
    for i in range(count):
        deltas = {}
        for path, (out, inp) in shapes.items():
            columns = path.endswith(("o_proj", "down_proj"))
            n = int(torch.randint(2, 10, (), generator=gen))
            index = torch.randperm(inp if columns else out, generator=gen)[:n]
            values = torch.randn((out, n) if columns else (n, inp), generator=gen) * 0.3
            deltas[path] = (Delta.columns if columns else Delta.rows)(index, values, (out, inp))
        adapters[f"a{i}"] = deltas
    return adapters


def test_many_adapters_are_stacked_per_module_and_each_row_equals_its_adapter_merged_alone():
    """8 column/row adapters of sizes 2-9 over 13 rows (uneven: 3, 2, 1 rows each, and 2 base rows): each module adds
    them with a few stacked groups (one bmm each), not one term per adapter, and every row equals its adapter
    merged alone; the stacks are adapter values only, kept for the next batch of the same set, dropped on remove."""
    from subtune.serve.batched import PAD_TOLERANCE, size_groups

    adapters = many_slice_adapters(8)
    store = AdapterStore(make_tiny(0))
    for name, deltas in adapters.items():
        store.add_deltas(name, deltas)
    names = ["a0", "a1", None, "a0", "a2", "a1", "a0", "a3", "a4", None, "a5", "a6", "a7"]
    x = ids(len(names), seq=6, seed=4)
    base = bits(store.model)
    mixed = store.logits(x, names)
    assert same_bits(store.model, base) and not hooks_left(store.model)
    routes = store._plan(sorted(set(n for n in names if n)))
    for path, route in routes.items():
        assert not route.loose and sorted(route.adapters) == sorted(adapters)
        sizes = [adapters[n][path].index.numel() for n in sorted(adapters)]
        assert len(route.stacks) == len(size_groups(sizes)) < len(adapters)
        for stack in route.stacks:
            group = [adapters[n][path].index.numel() for n in stack.names]
            assert max(group) <= (1 + PAD_TOLERANCE) * min(group) and stack.index.shape[-1] == max(group)
    values = sum(d.values.numel() * 4 for deltas in adapters.values() for d in deltas.values())
    indices = sum(s.index.numel() * 8 for r in routes.values() for s in r.stacks)
    assert values <= store.routing_cache_bytes - indices <= (1 + PAD_TOLERANCE) * values
    plain = forward(store.model, x)
    for row, name in enumerate(names):
        if name is None:
            assert torch.equal(mixed[row], plain[row])
            continue
        store.activate(name)
        torch.testing.assert_close(mixed[row], forward(store.model, x)[row], atol=1e-5, rtol=0)
        store.activate(None)
    assert store.logits(x, names).equal(mixed) and store._plan(sorted(adapters)) is routes  # reused, not rebuilt
    store.remove("a7")
    assert store.routing_cache_bytes == 0


def test_size_groups_bound_the_padding():
    from subtune.serve.batched import size_groups

    assert size_groups([256, 64, 128, 192, 64]) == [[1, 4], [2], [3], [0]]  # S²FT head counts: one group per size
    assert [len(g) for g in size_groups(list(range(92, 118)))] == [24, 2]  # channel counts 92-117: 92·1.25 = 115
    assert size_groups([5]) == [[0]] and size_groups([]) == []


def test_concurrent_calls_do_not_see_each_others_routing():
    """Each call's hooks exist only inside it; the store's lock keeps two threads' batches apart."""
    import threading

    store = store_with(["s2ft", "lamda", "smt"])
    x = ids(2)
    expected = {name: store.logits(x, [name, None]) for name in ["s2ft", "lamda", "smt"]}
    results, errors = [], []

    def work(name):
        try:
            for _ in range(3):
                results.append((name, store.logits(x, [name, None])))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(name,)) for name in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 9
    assert all(torch.equal(logits, expected[name]) for name, logits in results)
    assert not hooks_left(store.model)


class _Explode(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        raise RuntimeError("boom in the middle of generate")


def test_no_hooks_are_left_after_generate_even_when_it_raises():
    store = store_with(["s2ft", "lamda"])
    base = bits(store.model)
    x = ids(2)
    plain = forward(store.model, x)
    own = store.model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, i, o: None)  # a user's hook
    with pytest.raises(RuntimeError, match="boom"):
        store.generate(x, ["s2ft", "lamda"], max_new_tokens=3, do_sample=False, pad_token_id=0,
                       stopping_criteria=StoppingCriteriaList([_Explode()]))
    assert hooks_left(store.model) == ["model.layers.1.self_attn.o_proj"]  # only the user's own hook remains
    own.remove()
    store.generate(x, ["s2ft", "lamda"], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert not hooks_left(store.model)
    assert same_bits(store.model, base) and torch.equal(forward(store.model, x), plain)


# -------------------------------------------------------------------------------------------------- fusion
def disjoint_from(deltas: dict[str, Delta], taken: dict[str, Delta]) -> dict[str, Delta]:
    """The column/row deltas of `deltas` without the columns/rows `taken` already uses (S²FT's disjoint variant)."""
    out = {}
    for path, delta in deltas.items():
        other = taken.get(path)
        keep = torch.ones(delta.index.numel(), dtype=torch.bool)
        if other is not None:
            assert other.kind == delta.kind
            keep = ~torch.isin(delta.index, other.index)
        if keep.any():
            values = delta.values[:, keep] if delta.kind == "columns" else delta.values[keep]
            out[path] = type(delta)(delta.index[keep], values, delta.shape)
    return out


def test_fusing_disjoint_adapters_equals_applying_both():
    cs = trained("s2ft")[1]
    math_ = disjoint_from(trained("s2ft", config_seed=1)[1], cs)
    assert set(cs) & set(math_)  # they share modules (disjoint entries within them), so fusion really sums
    store = AdapterStore(make_tiny(0))
    store.add_deltas("cs", cs)
    store.add_deltas("math", math_)
    store.fuse({"cs": 1.0, "math": 1.0}, name="both")
    fused = store.deltas("both")
    assert set(fused) == set(cs) | set(math_) and {d.kind for d in fused.values()} <= {"columns", "rows"}

    reference = make_tiny(0)  # both merged by hand, one after the other
    modules = dict(reference.named_modules())
    for deltas in (cs, math_):
        for path, delta in deltas.items():
            delta.merge_into(modules[path].weight)
    x = ids(3)
    store.activate("both")
    assert same_bits(store.model, bits(reference))  # disjoint entries: the very same weights
    store.activate(None)
    torch.testing.assert_close(store.logits(x, ["both", "both", None])[:2], forward(reference, x)[:2], atol=1e-5,
                               rtol=0)


FUSIONS = {  # weights, and kinds the fused adapter must contain (so each rule of the docstring is exercised)
    "lowrank-and-dense": ({"s2ft": 0.5, "smt": 1.0, "lamda": 2.0, "lora": -1.0}, {"lowrank", "dense"}),
    "support-kinds": ({"s2ft": 1.0, "smt": 0.5, "senszo": 2.0}, {"sparse"}),
    "same-kind-overlapping": ({"s2ft": 1.0, "s2ft-seed1": -0.5}, {"columns", "rows"}),
}


@pytest.mark.parametrize("fusion", FUSIONS)
def test_weighted_fusion_sums_the_updates_and_says_which_kind_results(fusion):
    weights, required_kinds = FUSIONS[fusion]
    store = store_with()
    store.add_deltas("s2ft-seed1", trained("s2ft", config_seed=1)[1])
    store.fuse(weights, name="mix", info={"why": "test"})
    assert store.info("mix") == {"fused_from": weights, "why": "test"}
    fused = store.deltas("mix")
    sources = {name: store.deltas(name) for name in weights}
    assert set(fused) == set().union(*sources.values())
    for path, delta in fused.items():
        parts = {name: deltas[path] for name, deltas in sources.items() if path in deltas}
        expected = sum(weights[n] * d.to_dense(torch.float64) for n, d in parts.items())
        torch.testing.assert_close(delta.to_dense(torch.float64), expected, atol=1e-6, rtol=0)
        kinds = {d.kind for d in parts.values()}
        if len(kinds) == 1:
            assert delta.kind == kinds.pop()
            if delta.kind == "lowrank":  # factors concatenated, never densified
                assert delta.rank == sum(d.rank for d in parts.values())
            if delta.kind in ("columns", "rows"):  # union of the indices
                assert set(delta.index.tolist()) == set().union(*(d.index.tolist() for d in parts.values()))
        elif kinds <= SUPPORT_KINDS:
            assert delta.kind == "sparse"
        else:
            assert delta.kind == "dense"
    assert required_kinds <= {d.kind for d in fused.values()}
    x = ids(2)
    store.activate("mix")  # the fused adapter serves like any other: merged and routed agree
    merged = forward(store.model, x)
    store.activate(None)
    torch.testing.assert_close(store.logits(x, ["mix", "mix"]), merged, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------- adapter directories
def _use_file_deltas_until_read_deltas_lands(monkeypatch, directory: Path, deltas) -> None:
    """Before the adapter-format wiring (issue #11) adds subtune.read_deltas, stand in for it with the deltas
    written beside the adapter; once it exists the real one is tested."""
    if hasattr(api, "read_deltas"):
        return
    write_delta_file(directory / "test-deltas.safetensors", deltas)
    def read_deltas(adapter_dir, base=None):
        return read_delta_file(Path(adapter_dir) / "test-deltas.safetensors")[0]

    monkeypatch.setattr(api, "read_deltas", read_deltas, raising=False)


def test_add_reads_an_adapter_directory(tmp_path, monkeypatch):
    model, deltas = trained("s2ft")
    subtune.save(model, tmp_path / "s2ft")
    _use_file_deltas_until_read_deltas_lands(monkeypatch, tmp_path / "s2ft", deltas)
    store = AdapterStore(make_tiny(0))
    store.add_deltas("other", trained("lamda")[1])
    store.activate("other")  # the directory is read against the plain base; the active adapter comes back after
    assert store.add("cs", tmp_path / "s2ft") == "cs"
    assert store.active == "other"
    store.activate(None)
    assert store.info("cs")["method"] == "s2ft" and store.info("cs")["directory"] == str(tmp_path / "s2ft")
    x = ids(2)
    torch.testing.assert_close(store.logits(x, ["cs", None])[0], forward(model, x)[0], atol=1e-5, rtol=0)


def test_add_checks_name_and_base_before_reading_any_tensor(tmp_path, monkeypatch):
    def must_not_read(directory, base=None):
        raise AssertionError("read_deltas ran before the name and base checks")

    subtune.save(trained("s2ft", base_seed=1)[0], tmp_path / "other-base")
    subtune.save(trained("s2ft")[0], tmp_path / "mine")
    monkeypatch.setattr(api, "read_deltas", must_not_read, raising=False)
    store = AdapterStore(make_tiny(0))
    with pytest.raises(WrongBaseError, match="different base model"):
        store.add("x", tmp_path / "other-base")
    store.add_deltas("taken", trained("lamda")[1])
    with pytest.raises(DuplicateAdapterError):
        store.add("taken", tmp_path / "mine")
    assert store.names() == ["taken"]


# ------------------------------------------------------------------------------------ the bad-input catalogue
SHAPE = (32, 48)  # model.layers.0.mlp.down_proj of make_tiny: (hidden, intermediate)
DOWN = "model.layers.0.mlp.down_proj"


def small_delta(scale: float = 0.1) -> Delta:
    return Delta.columns([0, 5], scale * torch.ones(SHAPE[0], 2), SHAPE)


def store_of(**adapters) -> AdapterStore:
    store = AdapterStore(make_tiny(0))
    for name, deltas in adapters.items():
        store.add_deltas(name, deltas)
    return store


def _save_other_base(tmp: Path) -> None:
    subtune.save(trained("s2ft", base_seed=1)[0], tmp / "adapter")


def _save_same_base(tmp: Path) -> None:
    subtune.save(trained("s2ft")[0], tmp / "adapter")


def _active_then_generate(tmp):
    store = store_of(a={DOWN: small_delta()})
    store.activate("a")
    return store.generate(ids(1), ["a"], max_new_tokens=1)


def _nan_delta():
    values = torch.ones(SHAPE[0], 2)
    values[3, 1] = float("nan")
    return Delta.columns([0, 5], values, SHAPE)


CASES_SERVE = [
    Case("serve-duplicate-name", lambda tmp: store_of(a={DOWN: small_delta()}).add_deltas("a", {DOWN: small_delta()}),
         DuplicateAdapterError, ("'a'", "already taken", "remove"),
         tries="`store.add_deltas` under a name already taken", before="new"),
    Case("serve-duplicate-name-dir", lambda tmp: store_of(a={DOWN: small_delta()}).add("a", tmp / "adapter"),
         DuplicateAdapterError, ("already taken",), setup=_save_same_base,
         tries="`store.add` an adapter directory under a name already taken", before="new"),
    Case("serve-wrong-base-dir", lambda tmp: store_of().add("x", tmp / "adapter"), WrongBaseError,
         ("different base model", "tiny-seed1", "store of the base it was trained on"), setup=_save_other_base,
         tries="`store.add` an adapter trained on another base", before="new"),
    Case("serve-wrong-base-fingerprint",
         lambda tmp: store_of().add_deltas("x", {DOWN: small_delta()},
                                           fingerprint=base_fingerprint(make_tiny(1))),
         WrongBaseError, ("different base model", "embed_digest", "trained on"),
         tries="deltas with another base's fingerprint", before="new"),
    Case("serve-no-fingerprint", lambda tmp: store_of().add_deltas("x", {DOWN: small_delta()}, fingerprint="abc"),
         WrongBaseError, ("no base fingerprint", "subtune.save"),
         tries="deltas with a fingerprint that is not one", before="new"),
    Case("serve-bad-name", lambda tmp: store_of().add_deltas("  ", {DOWN: small_delta()}), AdapterNameError,
         ("non-empty string",), tries="a blank adapter name", before="new"),
    Case("serve-empty-deltas", lambda tmp: store_of().add_deltas("x", {}), AdapterMismatchError,
         ("non-empty mapping",), tries="an adapter with no deltas", before="new"),
    Case("serve-not-a-delta", lambda tmp: store_of().add_deltas("x", {DOWN: torch.zeros(SHAPE)}), AdapterMismatchError,
         ("expected a subtune delta", "delta.columns"), tries="a plain tensor where a delta belongs", before="new"),
    Case("serve-unknown-module", lambda tmp: store_of().add_deltas("x", {"base_model.model." + DOWN: small_delta()}),
         AdapterMismatchError, ("no module at that path", "plain model's module names"),
         tries="a delta for a module path the base lacks", before="new"),
    Case("serve-shape-mismatch",
         lambda tmp: store_of().add_deltas("x", {"model.layers.0.mlp.up_proj": small_delta()}),
         AdapterMismatchError, ("(32, 48)", "(48, 32)", "another base model"),
         tries="a delta of another shape than its module", before="new"),
    Case("serve-not-a-weight-module", lambda tmp: store_of().add_deltas("x", {"model.layers.0": small_delta()}),
         AdapterMismatchError, ("no weight parameter", "plain base"),
         tries="a delta for a module without a weight", before="new"),
    Case("serve-nonfinite-delta", lambda tmp: store_of().add_deltas("x", {DOWN: _nan_delta()}), NonFiniteError,
         ("nan or inf", DOWN, "lower learning rate"), tries="a NaN delta", before="new"),
    Case("serve-prepared-base",
         lambda tmp: AdapterStore(subtune.prepare(make_tiny(0), subtune.S2FTConfig(d_ratio=0.1))),
         ServeError, ("plain base model", "subtune.ops", "fresh base"),
         tries="an `AdapterStore` over a prepared model", before="new"),
    Case("serve-not-a-model", lambda tmp: AdapterStore("model.safetensors"), ServeError, ("nn.module", "str"),
         tries="`AdapterStore('model.safetensors')`", before="new"),
    Case("serve-unknown-adapter", lambda tmp: store_of(a={DOWN: small_delta()}).activate("b"), UnknownAdapterError,
         ("unknown adapter 'b'", "['a']", "store.add"),
         tries="`activate` an adapter that was never added", before="new"),
    Case("serve-unknown-adapter-in-batch",
         lambda tmp: store_of(a={DOWN: small_delta()}).logits(ids(2), ["a", "math"]), UnknownAdapterError,
         ("unknown adapter 'math'",), tries="an unknown adapter name in a batch", before="new"),
    Case("serve-generate-while-active", _active_then_generate, AdapterActiveError, ("merged", "activate(none)"),
         tries="per-request `generate` while an adapter is merged", before="new"),
    Case("serve-names-length", lambda tmp: store_of(a={DOWN: small_delta()}).logits(ids(3), ["a", None]),
         RoutingError, ("2 entries for a batch of 3", "one adapter name"),
         tries="2 adapter names for a batch of 3", before="new"),
    Case("serve-names-string", lambda tmp: store_of(a={DOWN: small_delta()}).logits(ids(1), "a"), RoutingError,
         ("a list",), tries="a string where the list of names belongs", before="new"),
    Case("serve-input-ids-1d", lambda tmp: store_of().logits(torch.tensor([1, 2, 3]), [None]), RoutingError,
         ("2-d (batch, seq)",), tries="1-d `input_ids`", before="new"),
    Case("serve-route-non-linear",
         lambda tmp: store_of(n={"model.norm": Delta.dense(torch.ones(1, 32))}).logits(ids(1), ["n"]),
         RoutingError, ("model.norm", "llamarmsnorm", "activate"),
         tries="route a delta on a norm per request", before="new"),
    Case("serve-fuse-bad-weight", lambda tmp: store_of(a={DOWN: small_delta()}).fuse({"a": float("nan")}, name="f"),
         ServeError, ("weight of 'a'", "finite"), tries="fuse with a NaN weight", before="new"),
    Case("serve-fuse-unknown", lambda tmp: store_of(a={DOWN: small_delta()}).fuse({"a": 1.0, "b": 1.0}, name="f"),
         UnknownAdapterError, ("unknown adapter 'b'",), tries="fuse an adapter that was never added", before="new"),
    Case("serve-fuse-empty", lambda tmp: store_of().fuse({}, name="f"), ServeError, ("non-empty mapping",),
         tries="fuse nothing", before="new"),
    Case("serve-fuse-taken-name",
         lambda tmp: store_of(a={DOWN: small_delta()}).fuse({"a": 1.0}, name="a"), DuplicateAdapterError,
         ("already taken",), tries="fuse under a name already taken", before="new"),
]


@cases_param(CASES_SERVE)
def test_catalogue_serve(case, tmp_path):
    check_case(case, tmp_path)


def test_a_refused_add_leaves_the_store_and_base_as_they_were():
    store = store_of(a={DOWN: small_delta()})
    store.activate("a")
    merged = bits(store.model)
    good, bad = {DOWN: small_delta(0.2)}, {"model.layers.0.mlp.up_proj": small_delta()}
    with pytest.raises(AdapterMismatchError):
        store.add_deltas("b", {**good, **bad})
    assert store.names() == ["a"] and store.active == "a" and same_bits(store.model, merged)


def test_a_failed_merge_rolls_back_what_it_merged():
    """If merging an adapter fails halfway (here: a weight cast behind the store's back), the base is left as it was."""
    store = store_of(a={DOWN: small_delta(), "model.layers.1.mlp.down_proj": small_delta()})
    base = bits(store.model)
    broken = store.deltas("a")["model.layers.1.mlp.down_proj"]

    def fail(weight):
        raise RuntimeError("merge failed")

    broken.merge_into = fail  # the second module's merge fails after the first one merged
    with pytest.raises(RuntimeError, match="merge failed"):
        store.activate("a")
    assert store.active is None and same_bits(store.model, base)


def test_unmerge_refuses_a_base_cast_behind_the_stores_back():
    store = store_of(a={DOWN: small_delta()})
    store.activate("a")
    store.model.to(torch.float64)
    with pytest.raises(ServeError, match="cast it back|cast the model back"):
        store.activate(None)
    assert store.active == "a"
    store.model.to(torch.float32)
    store.activate(None)
    assert same_bits(store.model, bits(make_tiny(0)))
