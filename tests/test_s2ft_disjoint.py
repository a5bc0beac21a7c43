"""S²FT `disjoint_from` (issue #12, item 3): the paper's non-overlapping fusion variant at training time.

References: the same config without `disjoint_from` (same seed -> the very same units, so any overlap would show),
the deltas read back from both adapters with `subtune.read_deltas` (no method code), a top-n over the free units
computed here from the weights' own norms, and `random.Random(seed)` drawing over the free units.
"""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny, perturb_trainable

import subtune
from reliability import Case, cases_param, check_case
from subtune.core.config import ConfigError
from subtune.methods.s2ft.select import choose_units, components, select_units, used_units
from subtune.ops.sliced import INPUT_COLUMNS
from subtune.recipes import make_config
from subtune.serve import AdapterStore

RATIOS = {"o_ratio": 0.25, "v_ratio": 0.5, "d_ratio": 0.2, "u_ratio": 0.2}  # the tiny model: 2 of 8 heads, 2 of 4 KV


def _train(directory, config, seed: int = 0):
    """Prepare on a fresh tiny base, move every trainable value (the stand-in for training), save; returns the model."""
    model = subtune.prepare(make_tiny(seed), config)
    perturb_trainable(model)
    subtune.save(model, directory)
    return model


def _indices(directory) -> dict[str, set[int]]:
    return {path: set(d.index.tolist()) for path, d in subtune.read_deltas(directory, base=make_tiny(0)).items()}


def test_two_adapters_trained_disjoint_share_no_unit_and_fuse_without_summing(tmp_path):
    config = subtune.S2FTConfig(**RATIOS, train_gate_with_up=True)
    _train(tmp_path / "a", config)
    _train(tmp_path / "same", config)
    _train(tmp_path / "b", subtune.S2FTConfig(**RATIOS, train_gate_with_up=True, disjoint_from=[tmp_path / "a"]))
    a, same, b = _indices(tmp_path / "a"), _indices(tmp_path / "same"), _indices(tmp_path / "b")
    assert a == same  # the control: without disjoint_from the same seed trains the very same units
    assert {p.rsplit(".", 1)[-1] for p in b} == {"o_proj", "v_proj", "down_proj", "up_proj", "gate_proj"}
    assert sum(map(len, a.values())) == sum(map(len, b.values()))  # the same budget
    for path in set(a) & set(b):
        assert not a[path] & b[path], f"{path}: {sorted(a[path] & b[path])} trained by both"
    # a third run kept clear of both (v has 4 KV units, 2 each: none left, so V is off)
    _train(tmp_path / "c", subtune.S2FTConfig(**{**RATIOS, "v_ratio": 0.0}, disjoint_from=[tmp_path / "a",
                                                                                          tmp_path / "b"]))
    c = _indices(tmp_path / "c")
    for path in c:
        assert not c[path] & (a.get(path, set()) | b.get(path, set())), path

    store = AdapterStore(make_tiny(0))  # non-overlapping fusion: every fused entry is one adapter's value
    store.add("a", tmp_path / "a")
    store.add("b", tmp_path / "b")
    store.fuse({"a": 1.0, "b": 1.0}, name="ab")
    da, db, fused = store.deltas("a"), store.deltas("b"), store.deltas("ab")
    for path, delta in fused.items():
        parts = [d[path].to_dense() for d in (da, db) if path in d]
        assert torch.equal(delta.to_dense(), sum(parts))
        if len(parts) == 2:
            assert not ((parts[0] != 0) & (parts[1] != 0)).any(), path


def test_heads_map_through_head_dim_on_gqa_with_explicit_head_dim(tmp_path):
    shape = dict(hidden=32, heads=4, kv_heads=2, head_dim=16, intermediate=40)
    model = subtune.prepare(make_tiny(0, **shape), subtune.S2FTConfig(o_ratio=0.5, v_ratio=0.5, d_ratio=0.0))
    subtune.save(model, tmp_path / "a")
    chosen = model.subtune_state.selection.tensors
    used = used_units(make_tiny(0, **shape), [str(tmp_path / "a")])
    for name in ("o_proj", "v_proj"):
        for layer in range(2):
            expected = set(chosen[f"layers.{layer}.{name}"].tolist()) if f"layers.{layer}.{name}" in chosen else set()
            assert used[name][layer] == expected  # units, not columns: the 16 columns of a head are one unit
    assert used["down_proj"] == [set(), set()] and used["up_proj"] == [set(), set()]


def _weight_norm_reference(model, name: str, excluded: list[set[int]], n: int, largest: bool, uniform_counts=None):
    """Top-n free units by the L2 norm of their weight columns/rows, computed here from the weights."""
    comp = components(model)[name]
    scored = []
    for layer, block in enumerate(model.model.layers):
        w = block.get_submodule(comp.module).weight.detach().float()
        per = w.t() if comp.kind == INPUT_COLUMNS else w
        norms = per.reshape(comp.units, -1).norm(dim=1)  # a unit's unit_size columns/rows, all their entries
        scored += [(float(norms[u]), layer, u) for u in range(comp.units) if u not in excluded[layer]]
    chosen = [[] for _ in model.model.layers]
    if uniform_counts is None:
        for _, layer, u in sorted(scored, key=lambda t: t[0], reverse=largest)[:n]:
            chosen[layer].append(u)
    else:
        for layer, count in enumerate(uniform_counts):
            mine = [t for t in scored if t[1] == layer]
            chosen[layer] = [u for _, _, u in sorted(mine, key=lambda t: t[0], reverse=largest)[:count]]
    return [sorted(c) for c in chosen]


@pytest.mark.parametrize("direction", ["large", "small"])
def test_weight_selection_with_exclusion_is_the_top_of_the_remaining_units(tmp_path, direction):
    _train(tmp_path / "a", subtune.S2FTConfig(**RATIOS))
    base = make_tiny(0)
    config = subtune.S2FTConfig(**RATIOS, strategy="weight", direction=direction, disjoint_from=[tmp_path / "a"])
    excluded = used_units(base, config.disjoint_from)
    assert any(excluded["down_proj"]) and any(excluded["o_proj"])
    chosen = select_units(base, config, None)
    for name, field in (("o_proj", "o_ratio"), ("v_proj", "v_ratio"), ("down_proj", "d_ratio"),
                        ("up_proj", "u_ratio")):
        comp = components(base)[name]
        n = int(2 * comp.units * RATIOS[field])
        assert chosen[name] == _weight_norm_reference(base, name, excluded[name], n, direction == "large"), name


def test_uniform_weight_selection_with_exclusion_is_the_top_of_each_layers_remaining_units():
    base = make_tiny(0, intermediate=96)
    excluded = [set(range(0, 96, 3)), set(range(40, 90))]
    scores = torch.stack([block.mlp.down_proj.weight.detach().float().norm(dim=0) for block in base.model.layers])
    got = choose_units(19, 2, 96, "uniform", random.Random(4), scores, largest=True, excluded=excluded)
    counts = [len(g) for g in got]  # the per-layer counts are the uniform split's own draw
    assert sorted(counts) == [9, 10]
    assert got == _weight_norm_reference(base, "down_proj", excluded, 19, True, uniform_counts=counts)


def _reference_draw(rng: random.Random, n: int, layers: int, units: int, allocation: str, free: list[list[int]]):
    """The paper's random selection written out: one draw over the (layer, unit) pairs, or a count per layer and a
    draw inside each layer, made over the free units only."""
    if allocation == "global":
        flat = rng.sample([layer * units + u for layer in range(layers) for u in free[layer]], n)
        return [sorted(f % units for f in flat if f // units == layer) for layer in range(layers)]
    counts = [n // layers] * layers
    for i in rng.sample(range(layers), n % layers):
        counts[i] += 1
    return [sorted(rng.sample(free[layer], counts[layer])) for layer in range(layers)]


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_random_selection_draws_from_the_remaining_units_and_is_unchanged_without_exclusion(allocation):
    layers, units, n = 3, 50, 30
    excluded = [set(range(0, 50, 2)), set(), set(range(10, 45))]
    free = [[u for u in range(units) if u not in excluded[layer]] for layer in range(layers)]
    got = choose_units(n, layers, units, allocation, random.Random(7), None, True, excluded=excluded)
    assert got == _reference_draw(random.Random(7), n, layers, units, allocation, free)
    assert all(not set(g) & excluded[layer] for layer, g in enumerate(got)) and sum(map(len, got)) == n
    # nothing excluded: exactly the draw over range(...) that selection made before disjoint_from existed
    everything = [list(range(units))] * layers
    plain = _reference_draw(random.Random(7), n, layers, units, allocation, everything)
    if allocation == "global":
        flat = random.Random(7).sample(range(layers * units), n)
        assert plain == [sorted(f % units for f in flat if f // units == layer) for layer in range(layers)]
    assert choose_units(n, layers, units, allocation, random.Random(7), None, True) == plain
    assert choose_units(n, layers, units, allocation, random.Random(7), None, True, excluded=[set()] * 3) == plain


def test_saved_config_keeps_disjoint_from_and_loads_after_the_other_adapter_is_gone(tmp_path):
    _train(tmp_path / "a", subtune.S2FTConfig(**RATIOS))
    trained = _train(tmp_path / "b", subtune.S2FTConfig(**RATIOS, disjoint_from=[tmp_path / "a"]))
    assert subtune.read_adapter_config(tmp_path / "b")["config"]["disjoint_from"] == [str(tmp_path / "a")]
    shutil.rmtree(tmp_path / "a")  # load re-attaches the saved selection; it never selects again
    loaded = subtune.load(make_tiny(0), tmp_path / "b")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)


def test_cli_option_is_a_comma_separated_list(tmp_path):
    config = make_config("s2ft", overrides={"disjoint_from": f"{tmp_path / 'a'}, {tmp_path / 'b'}"})
    assert config.disjoint_from == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_cli_train_with_disjoint_from_keeps_clear_of_the_first_run(tmp_path):
    """`subtune train ... --disjoint-from DIR` end to end on the embedded model (2 one-step runs)."""
    from subtune.cli import main

    common = ["train", "--method", "s2ft", "--max-steps", "1", "--batch-size", "2", "--d_ratio", "0.05",
              "--o_ratio", "0.25"]
    first = CliRunner().invoke(main, common + ["--output", str(tmp_path / "one")])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(main, common + ["--output", str(tmp_path / "two"),
                                                "--disjoint-from", str(tmp_path / "one" / "adapter")])
    assert second.exit_code == 0, second.output
    one = {p: set(d.index.tolist()) for p, d in subtune.read_deltas(tmp_path / "one" / "adapter").items()}
    two = {p: set(d.index.tolist()) for p, d in subtune.read_deltas(tmp_path / "two" / "adapter").items()}
    assert sum(map(len, one.values())) == sum(map(len, two.values())) > 0
    assert all(not one[p] & two[p] for p in set(one) & set(two))


def test_a_refused_exclusion_leaves_the_model_untouched(tmp_path):
    _train(tmp_path / "a", subtune.S2FTConfig(o_ratio=0.0, d_ratio=0.75))
    model = make_tiny(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="only 24 of 96 remain"):
        subtune.prepare(model, subtune.S2FTConfig(o_ratio=0.0, d_ratio=0.5, disjoint_from=[tmp_path / "a"]))
    assert getattr(model, "subtune_state", None) is None
    assert all(type(m).__module__.startswith("transformers") or type(m).__module__.startswith("torch")
               for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------- the catalogue
def _save(config, seed: int = 0):
    def setup(tmp):
        _train(tmp / "adapter", config, seed)
    return setup


def _calibration():
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(123))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}] * 2


def _save_other(method_config):
    def setup(tmp):
        model = subtune.prepare(make_tiny(0), method_config, calibration=_calibration())
        perturb_trainable(model)
        subtune.save(model, tmp / "adapter")
    return setup


def _export_lora(tmp):
    model = subtune.prepare(make_tiny(0), subtune.S2FTConfig(**RATIOS))
    subtune.export_lora(model, tmp / "lora")


def _prepare(tmp, directory="adapter", **fields):
    return subtune.prepare(make_tiny(0), subtune.S2FTConfig(**{**RATIOS, **fields},
                                                            disjoint_from=[tmp / directory]))


CASES = [
    Case("s2ft-disjoint-empty-path", lambda tmp: subtune.S2FTConfig(disjoint_from=[""]), ConfigError,
         ("disjoint_from[0]", "empty path"), tries="`disjoint_from` holding an empty path", before="new"),
    Case("s2ft-disjoint-twice", lambda tmp: subtune.S2FTConfig(disjoint_from=["a", "a"]), ConfigError,
         ("'a' twice", "once"), tries="`disjoint_from` naming one adapter twice", before="new"),
    Case("s2ft-disjoint-not-a-list", lambda tmp: subtune.S2FTConfig(disjoint_from="runs/a"), ConfigError,
         ("disjoint_from must be a list of str",), tries="`disjoint_from` given one string, not a list",
         before="new"),
    Case("s2ft-disjoint-missing-dir", lambda tmp: _prepare(tmp, "nowhere"), ConfigError,
         ("disjoint_from adapter", "nowhere", "does not exist", "remove it from disjoint_from"),
         tries="`disjoint_from` naming no directory",
         before="new"),
    Case("s2ft-disjoint-peft-dir", lambda tmp: _prepare(tmp, "lora"), ConfigError,
         ("disjoint_from adapter", "peft lora adapter, not a subtune adapter", "remove it from disjoint_from"),
         setup=_export_lora,
         tries="`disjoint_from` naming a PEFT LoRA export, not a subtune adapter", before="new"),
    Case("s2ft-disjoint-other-base", _prepare, ConfigError,
         ("different base model", "tiny-seed1", "remove it from disjoint_from"), setup=_save(subtune.S2FTConfig(
             **RATIOS), seed=1), tries="`disjoint_from` naming an S²FT adapter of another base", before="new"),
    Case("s2ft-disjoint-lora-adapter", _prepare, ConfigError,
         ("'lora' adapter", "lowrank deltas", "columns/rows", "remove it from disjoint_from"),
         setup=_save_other(subtune.LoraConfig(r=2)), tries="`disjoint_from` naming a LoRA adapter (lowrank deltas)",
         before="new"),
    Case("s2ft-disjoint-smt-adapter", _prepare, ConfigError,
         ("'smt' adapter", "blocks deltas", "remove it from disjoint_from"),
         setup=_save_other(subtune.SMTConfig(block_size=8, num_blocks=6, warmup_steps=2)),
         tries="`disjoint_from` naming an SMT adapter (blocks deltas)", before="new"),
    Case("s2ft-disjoint-full-adapter", _prepare, ConfigError,
         ("'full' adapter", "base_changed", "remove it from disjoint_from"), setup=_save_other(subtune.FullConfig()),
         tries="`disjoint_from` naming a full fine-tuning adapter (absolute weights)", before="new"),
    Case("s2ft-disjoint-budget", lambda tmp: _prepare(tmp, d_ratio=0.85), ConfigError,
         ("d_ratio=0.85 asks for 81 down channels", "only 77 of 96 remain", "excluding the 19",
          "lower d_ratio to at most 0.8021"), setup=_save(subtune.S2FTConfig(**RATIOS)),
         tries="a ratio the units left free by `disjoint_from` cannot meet", before="new"),
    Case("s2ft-disjoint-budget-none-left", lambda tmp: _prepare(tmp, v_ratio=0.25), ConfigError,
         ("v_ratio=0.25 asks for 1 v key/value heads", "only 0 of 4 remain", "set v_ratio=0"),
         setup=_save(subtune.S2FTConfig(**{**RATIOS, "v_ratio": 1.0})),
         tries="a ratio for units that `disjoint_from` adapters already use up", before="new"),
    Case("s2ft-disjoint-uniform-layer-full", lambda tmp: _prepare(tmp, allocation="uniform", d_ratio=0.5),
         ConfigError, ("allocation='uniform' needs 24 down channels in layer", "are free after disjoint_from",
                       "allocation='global'"),
         setup=_save(subtune.S2FTConfig(o_ratio=0.0, d_ratio=0.5, allocation="global", seed=3)),
         tries="uniform allocation where a layer has too few free units after `disjoint_from`", before="new"),
]


@cases_param(CASES)
def test_catalogue_s2ft_disjoint(case, tmp_path):
    check_case(case, tmp_path)
