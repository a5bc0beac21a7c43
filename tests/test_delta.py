"""The method-neutral update record (subtune.core.deltas): every kind against a hand-built dense reference, on odd
shapes (37x23, blocks of 8 with ragged edges), in fp32 and float64, and bf16 weights for bit-exact unmerge."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from reliability import Case, cases_param, check_case
from subtune.core.deltas import (
    DELTA_METADATA_KEY, Delta, DeltaError, deltas_from_tensors, deltas_to_tensors, fuse, lora_factors,
    read_delta_file, write_delta_file,
)
from subtune.core.errors import AdapterLoadError, ExportError, SubtuneError

OUT, IN, BS = 37, 23, 8  # a 5x3 grid of 8x8 blocks; the last block-row has 5 rows, the last block-column 7 columns
KINDS = ["columns", "rows", "blocks", "sparse", "lowrank", "dense"]
SUPPORT = {"columns", "rows", "blocks", "sparse"}
MODULE = "model.layers.0.mlp.down_proj"

# per kind: the index sets of two overlapping deltas (None: the kind has no index)
COLUMNS = ([22, 0, 5, 11], [5, 7, 22])
ROWS = ([36, 0, 17], [17, 2])
BLOCKS = (([4, 4, 1, 1], [2, 0, 2, 1]), ([1, 0, 4], [1, 0, 2]))  # (4, 2) is ragged both ways
SPARSE = ([0, 850, 24, 400, 401, 23 * 5 + 22, 36 * 23, 77], [850, 3, 77, 500])
# blocks: block-rows {1, 4} cover 8 + 5 rows, fewer than the 8 + 8 + 7 columns of block-columns {0, 1, 2}
EXACT_RANK = {"columns": 4, "rows": 3, "blocks": 13, "lowrank": 3, "dense": 23,
              "sparse": min(len({f // IN for f in SPARSE[0]}), len({f % IN for f in SPARSE[0]}))}
SAVED_ENTRIES = {"columns": OUT * 4, "rows": 3 * IN, "blocks": 5 * 7 + 5 * 8 + 8 * 7 + 8 * 8, "sparse": 8,
                 "lowrank": OUT * IN, "dense": OUT * IN}


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def build(kind: str, dtype=torch.float32, alt: int = 0, seed: int = 0) -> tuple[Delta, torch.Tensor]:
    """A delta and its float64 dense form built by hand, entry by entry."""
    ref = torch.zeros(OUT, IN, dtype=torch.float64)
    if kind == "columns":
        index = COLUMNS[alt]
        values = rand(OUT, len(index), dtype=dtype, seed=seed)
        for j, col in enumerate(index):
            ref[:, col] = values[:, j].double()
        return Delta.columns(index, values, (OUT, IN)), ref
    if kind == "rows":
        index = ROWS[alt]
        values = rand(len(index), IN, dtype=dtype, seed=seed)
        for i, row in enumerate(index):
            ref[row, :] = values[i].double()
        return Delta.rows(index, values, (OUT, IN)), ref
    if kind == "blocks":
        row_blocks, col_blocks = BLOCKS[alt]
        values = rand(len(row_blocks), BS, BS, dtype=dtype, seed=seed)  # padding is random too: it must be ignored
        for i, (rb, cb) in enumerate(zip(row_blocks, col_blocks)):
            for u, v in itertools.product(range(BS), range(BS)):
                if rb * BS + u < OUT and cb * BS + v < IN:
                    ref[rb * BS + u, cb * BS + v] = values[i, u, v].double()
        return Delta.blocks(row_blocks, col_blocks, BS, values, (OUT, IN)), ref
    if kind == "sparse":
        flat = SPARSE[alt]
        values = rand(len(flat), dtype=dtype, seed=seed)
        for f, v in zip(flat, values.double()):
            ref[f // IN, f % IN] = v
        return Delta.sparse(flat, values, (OUT, IN)), ref
    if kind == "lowrank":
        a, b = rand(3, IN, dtype=dtype, seed=seed), rand(OUT, 3, dtype=dtype, seed=seed + 100)
        scale = 0.5 if alt == 0 else 2.0
        return Delta.lowrank(a, b, scale), scale * (b.double() @ a.double())
    values = rand(OUT, IN, dtype=dtype, seed=seed)
    return Delta.dense(values), values.double()


def tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype != torch.float64 else {"rtol": 1e-12, "atol": 1e-12}


# ------------------------------------------------------------------------------------------------------ dense form
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_to_dense_matches_hand_built(kind, dtype):
    delta, ref = build(kind, dtype)
    assert delta.kind == kind and delta.shape == (OUT, IN)
    dense = delta.to_dense()
    assert dense.shape == (OUT, IN) and dense.dtype == dtype
    if kind == "lowrank":
        torch.testing.assert_close(dense.double(), ref, **tol(dtype))
    else:
        assert torch.equal(dense.double(), ref)  # placing values is exact


# ---------------------------------------------------------------------------------------------------------- apply
@pytest.mark.parametrize("lead", [(), (7,), (2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_apply_equals_dense_matmul(kind, dtype, lead):
    delta, ref = build(kind, dtype)
    x, y = rand(*lead, IN, dtype=dtype, seed=1), rand(*lead, OUT, dtype=dtype, seed=2)
    out = delta.apply(x, y)
    assert out.shape == y.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), y.double() + x.double() @ ref.T, **tol(dtype))


def test_blocks_on_an_exact_grid_with_a_non_contiguous_input():
    delta = Delta.blocks([0, 1, 1], [2, 0, 2], BS, rand(3, BS, BS), (16, 24))
    x = rand(24, 6).t()  # (6, 24), not contiguous
    y = rand(6, 16, seed=1)
    torch.testing.assert_close(delta.apply(x, y), y + x @ delta.to_dense().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_apply_to_a_subset_of_batch_rows(kind):
    """Batched serving: only the chosen requests of a batch get this adapter."""
    delta, ref = build(kind, torch.float64)
    x, y = rand(3, 4, IN, dtype=torch.float64, seed=1), rand(3, 4, OUT, dtype=torch.float64, seed=2)
    out = delta.apply(x, y, batch_rows=torch.tensor([2, 0]))
    assert torch.equal(out[1], y[1])
    torch.testing.assert_close(out[[0, 2]], y[[0, 2]] + x[[0, 2]] @ ref.T, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ merge / unmerge
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_then_unmerge_restores_bit_for_bit(kind, weight_dtype):
    delta, ref = build(kind, torch.float64 if weight_dtype == torch.float64 else torch.float32)
    layer = nn.Linear(IN, OUT, bias=False).to(weight_dtype)  # a Parameter that requires grad: merge must cope
    original = layer.weight.detach().clone()
    saved = delta.merge_into(layer.weight)
    dtype = torch.promote_types(weight_dtype, delta.compute_dtype)
    assert torch.equal(layer.weight, (original.to(dtype) + delta.to_dense(dtype)).to(weight_dtype))  # rounded once
    if weight_dtype != torch.bfloat16:
        torch.testing.assert_close(layer.weight.double(), original.double() + ref, **tol(weight_dtype))
    assert saved.numel() == SAVED_ENTRIES[kind]  # sparse kinds keep only the entries they touched
    delta.unmerge_from(layer.weight, saved)
    assert torch.equal(layer.weight, original)


@pytest.mark.parametrize("kind", KINDS)
def test_stacked_merges_unmerge_in_reverse_order(kind):
    """Switching adapters: merge two, take them out last-in first-out, the bf16 base comes back exactly."""
    first, _ = build(kind)
    second, _ = build(kind, alt=1, seed=5)
    weight = rand(OUT, IN, dtype=torch.bfloat16, seed=9)
    original = weight.clone()
    saved_first = first.merge_into(weight)
    saved_second = second.merge_into(weight)
    second.unmerge_from(weight, saved_second)
    first.unmerge_from(weight, saved_first)
    assert torch.equal(weight, original)


# ----------------------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_to_lora_is_exact_at_the_stated_rank(kind, dtype):
    delta, _ = build(kind, dtype)
    assert delta.exact_lora_rank() == EXACT_RANK[kind]
    a, b, scale, info = delta.to_lora(max_rank=EXACT_RANK[kind])
    r = EXACT_RANK[kind]
    assert a.shape == (r, IN) and b.shape == (OUT, r) and info["rank"] == r and info["exact"] and info["error"] == 0
    product = scale * (b @ a)
    if kind == "lowrank":
        torch.testing.assert_close(product, delta.to_dense(), rtol=1e-6, atol=1e-6)
    else:
        assert scale == 1.0 and torch.equal(product, delta.to_dense())  # one-hot factors multiply exactly


def test_blocks_lora_factors_over_the_fewer_side():
    """One block-column under five block-rows: column one-hot factors of rank 8 (not the 37 rows)."""
    delta = Delta.blocks([0, 1, 2, 3, 4], [1, 1, 1, 1, 1], BS, rand(5, BS, BS), (OUT, IN))
    a, b, _, info = delta.to_lora(max_rank=8)
    assert info["rank"] == 8 and info["how"] == "one-hot columns"
    assert torch.equal(b @ a, delta.to_dense())


def test_lowrank_wider_than_the_matrix_exports_at_the_smaller_dimension():
    """Fusing many low-rank deltas can give r > min(out, in); the exact export then needs only min(out, in)."""
    delta = fuse([build("lowrank", seed=s)[0] for s in range(9)])  # rank 27 > 23 input features
    assert delta.rank == 27 and delta.exact_lora_rank() == IN
    a, b, scale, info = delta.to_lora(max_rank=IN)
    assert info["exact"] and a.shape == (IN, IN)
    torch.testing.assert_close(scale * (b @ a), delta.to_dense(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_to_lora_over_the_cap_raises_naming_the_rank(kind):
    delta, _ = build(kind)
    r = EXACT_RANK[kind]
    with pytest.raises(ExportError, match=f"needs LoRA rank {r}, above max_rank={r - 1}.*fallback='svd'"):
        delta.to_lora(max_rank=r - 1, name=MODULE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_svd_fallback_reports_its_real_error(kind, dtype):
    delta, _ = build(kind, dtype)
    a, b, scale, info = delta.to_lora(max_rank=2, fallback="svd")
    assert a.shape == (2, IN) and b.shape == (OUT, 2) and not info["exact"] and info["rank"] == 2
    assert info["exact_rank"] == EXACT_RANK[kind]
    full = delta.to_dense(torch.float64)
    real = float(torch.linalg.norm(full - scale * (b.double() @ a.double())) / torch.linalg.norm(full))
    assert abs(info["error"] - real) <= 1e-12
    s = torch.linalg.svdvals(full)
    best = float((s[2:].square().sum() / s.square().sum()).sqrt())  # Eckart-Young: nothing of rank 2 does better
    assert real > 0 and abs(real - best) <= (1e-5 if dtype == torch.float32 else 1e-12)


def test_lora_factors_for_a_whole_adapter():
    """Scales fold into B; an over-cap module gets SVD factors only with fallback='svd'."""
    deltas = {f"m.{kind}": build(kind)[0] for kind in KINDS}
    factors, info = lora_factors(deltas, max_rank=64)
    assert info["exact"] and info["ranks"] == {f"m.{k}": EXACT_RANK[k] for k in KINDS}
    for name, (a, b) in factors.items():
        torch.testing.assert_close(b @ a, deltas[name].to_dense(), rtol=1e-6, atol=1e-6)
    factors, info = lora_factors(deltas, max_rank=5, fallback="svd")
    assert set(info["svd_errors"]) == {"m.blocks", "m.sparse", "m.dense"} and not info["exact"]
    assert all(a.shape[0] <= 5 for a, _ in factors.values())


# --------------------------------------------------------------------------------------------------------- fusion
@pytest.mark.parametrize("kind", KINDS)
def test_adding_two_deltas_of_a_kind_keeps_the_kind(kind):
    first, ref_first = build(kind)
    second, ref_second = build(kind, alt=1, seed=3)  # partly overlapping indices
    total = first + second
    assert total.kind == kind
    if kind == "lowrank":
        assert total.rank == 6  # the factors are concatenated
        torch.testing.assert_close(total.to_dense().double(), ref_first + ref_second, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(total.to_dense(), first.to_dense() + second.to_dense())


@pytest.mark.parametrize("left, right", list(itertools.combinations(KINDS, 2)))
def test_adding_mixed_kinds(left, right):
    """Entry-set kinds give a sparse delta (only touched entries); a mix with lowrank or dense gives dense."""
    first, ref_first = build(left)
    second, ref_second = build(right, alt=1, seed=3)
    total = first + second
    assert total.kind == ("sparse" if {left, right} <= SUPPORT else "dense")
    torch.testing.assert_close(total.to_dense().double(), ref_first + ref_second, rtol=1e-6, atol=1e-6)


def test_blocks_of_different_sizes_add_as_sparse():
    small = Delta.blocks([0], [0], 4, rand(1, 4, 4), (OUT, IN))
    big, _ = build("blocks")
    total = small + big
    assert total.kind == "sparse"
    assert torch.equal(total.to_dense(), small.to_dense() + big.to_dense())


@pytest.mark.parametrize("kind", KINDS)
def test_scaled_and_fuse(kind):
    first, ref_first = build(kind)
    second, ref_second = build(kind, alt=1, seed=3)
    torch.testing.assert_close(first.scaled(-0.25).to_dense().double(), -0.25 * ref_first, rtol=1e-6, atol=1e-6)
    fused = fuse([first, second], [0.5, 2.0])
    torch.testing.assert_close(fused.to_dense().double(), 0.5 * ref_first + 2.0 * ref_second, rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------------------------------------- serialisation
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_tensors_and_meta_round_trip(kind, dtype):
    delta, _ = build(kind, dtype)
    tensors = delta.to_tensors(MODULE)
    assert all(key.startswith(MODULE + ".") for key in tensors)
    meta = json.loads(json.dumps(delta.meta()))  # JSON-able
    back = Delta.from_tensors(MODULE, tensors, meta)
    assert type(back) is type(delta) and back.shape == delta.shape and back.meta() == delta.meta()
    for name in delta.tensor_fields:
        assert getattr(back, name).dtype == getattr(delta, name).dtype
        assert torch.equal(getattr(back, name), getattr(delta, name))


def test_delta_file_round_trip_with_method_state(tmp_path):
    """One self-describing file: every kind, two modules sharing one index tensor (S²FT gate + up), extra state."""
    deltas = {f"model.layers.0.{kind}": build(kind)[0] for kind in KINDS}
    index = torch.tensor([3, 9])
    deltas["model.layers.1.mlp.up_proj"] = Delta.rows(index, rand(2, IN), (OUT, IN))
    deltas["model.layers.1.mlp.gate_proj"] = Delta.rows(index, rand(2, IN, seed=4), (OUT, IN))
    mask = torch.tensor([True, False, True])
    write_delta_file(tmp_path / "adapter.safetensors", deltas, extra={"state.b_frozen": mask})
    back, extra = read_delta_file(tmp_path / "adapter.safetensors")
    assert set(back) == set(deltas) and torch.equal(extra["state.b_frozen"], mask) and set(extra) == {"state.b_frozen"}
    for name, delta in deltas.items():
        assert back[name].kind == delta.kind and torch.equal(back[name].to_dense(), delta.to_dense())


def test_to_device_and_dtype():
    delta, _ = build("columns")
    half = delta.to(dtype=torch.bfloat16)
    assert half.values.dtype == torch.bfloat16 and half.index.dtype == torch.long
    assert half.compute_dtype == torch.float32 and delta.values.dtype == torch.float32  # the original is untouched


# ------------------------------------------------------------------------------------ the layers in ops/ as deltas
def _base(dtype=torch.float64) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN, OUT).to(dtype).requires_grad_(False)  # frozen, as prepare() leaves it


def _perturbed(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(rand(*p.shape, dtype=p.dtype, seed=11))
    return layer


def _training_layers(dtype=torch.float64):
    """(layer, the delta a method would state for it) for each op in subtune.ops, on a `dtype` base."""
    from subtune.ops.block_sparse import BlockDeltaLinear
    from subtune.ops.lowdim import LowDimLinear
    from subtune.ops.sliced import INPUT_COLUMNS, OUTPUT_ROWS, SlicedDeltaLinear
    from subtune.ops.sparse import DenseAndSparseLinear

    out = []
    layer = _perturbed(SlicedDeltaLinear(_base(dtype), torch.tensor(COLUMNS[0]), INPUT_COLUMNS))
    out.append((layer, Delta.columns(layer.index, layer.delta, (OUT, IN))))
    layer = _perturbed(SlicedDeltaLinear(_base(dtype), torch.tensor(ROWS[0]), OUTPUT_ROWS))
    out.append((layer, Delta.rows(layer.index, layer.delta, (OUT, IN))))
    layer = _perturbed(BlockDeltaLinear(_base(dtype), torch.tensor(BLOCKS[0][0]), torch.tensor(BLOCKS[0][1]), BS))
    out.append((layer, Delta.blocks(layer.rows, layer.cols, BS, layer.delta, (OUT, IN))))
    layer = _perturbed(LowDimLinear(_base(dtype), rand(3, IN, dtype=dtype), rand(OUT, 3, dtype=dtype),
                                    torch.zeros(3, 3, dtype=dtype), 0.5))  # LaMDA: B' = B S
    out.append((layer, Delta.lowrank(layer.lora_A, layer.lora_B @ layer.lora_S, layer.scaling)))
    base = _base(dtype)
    original = base.weight.detach().clone()
    layer = _perturbed(DenseAndSparseLinear(base, torch.tensor(SPARSE[0]), quantize="none"))
    flat = layer.rows * IN + layer.cols  # SensZOQ trains absolute values: the delta is against the original weight
    out.append((layer, Delta.sparse(flat, layer.values.to(dtype) - original.view(-1)[flat], (OUT, IN))))
    return out


def test_training_layers_state_their_update_as_deltas():
    """Each op's layer, read as a delta: same forward over the untouched base, same dense update."""
    x = rand(2, 5, IN, dtype=torch.float64, seed=1)
    for layer, delta in _training_layers():
        untouched = _base()
        with torch.no_grad():
            torch.testing.assert_close(delta.apply(x, untouched(x)), layer(x), rtol=1e-12, atol=1e-12)
        if hasattr(layer, "dense_delta"):
            assert torch.equal(delta.to_dense().double(), layer.dense_delta())
        elif hasattr(layer, "delta_weight"):
            assert torch.equal(delta.to_dense(), layer.delta_weight())


def test_merge_matches_the_training_layers_in_fp32():
    """The generic merge gives the weights each layer's own merge gives (fp32 bases): no method's numbers move."""
    for layer, delta in _training_layers(torch.float32)[:4]:
        weight = _base(torch.float32).weight.detach().clone()
        delta.merge_into(weight)
        layer.merge()
        assert torch.equal(weight, layer.base_layer.weight)


# -------------------------------------------------------------------------------------- bad inputs (catalogue)
def _good_tensors() -> tuple[dict, dict]:
    delta = Delta.columns([0, 5, 22], rand(OUT, 3), (OUT, IN))
    return deltas_to_tensors({MODULE: delta})


def _bad_file(tamper, table: str | None = None):
    """setup(tmp): writes adapter.safetensors after `tamper(tensors, table)` (or with a raw `table` string)."""
    def setup(tmp):
        tensors, good_table = _good_tensors()
        tamper(tensors, good_table)
        save_file(tensors, str(tmp / "adapter.safetensors"),
                  metadata={DELTA_METADATA_KEY: table if table is not None else json.dumps(good_table)})
    return setup


def _read(tmp):
    return read_delta_file(tmp / "adapter.safetensors")


def _set(key, value):
    def tamper(tensors, table):
        tensors[f"delta.{MODULE}.{key}"] = value
    return tamper


def _meta(**changes):
    def tamper(tensors, table):
        table[MODULE].update(changes)
    return tamper


def _without_header(tmp):
    tensors, _ = _good_tensors()
    save_file(tensors, str(tmp / "adapter.safetensors"))


def _truncated(tmp):
    _bad_file(lambda t, m: None)(tmp)
    path = tmp / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _lowrank_file(tamper):
    def setup(tmp):
        tensors, table = deltas_to_tensors({MODULE: Delta.lowrank(rand(3, IN), rand(OUT, 3), 0.5)})
        tamper(tensors, table)
        save_file(tensors, str(tmp / "adapter.safetensors"), metadata={DELTA_METADATA_KEY: json.dumps(table)})
    return setup


def _blocks_file(tamper):
    def setup(tmp):
        tensors, table = deltas_to_tensors({MODULE: Delta.blocks([0, 4], [0, 2], BS, rand(2, BS, BS), (OUT, IN))})
        tamper(tensors, table)
        save_file(tensors, str(tmp / "adapter.safetensors"), metadata={DELTA_METADATA_KEY: json.dumps(table)})
    return setup


def _orphan(tensors, table):
    tensors["delta.model.layers.9.mlp.down_proj.values"] = torch.zeros(2, 2)


def _drop_values(tensors, table):
    del tensors[f"delta.{MODULE}.values"]


def _nan_values(tensors, table):
    tensors[f"delta.{MODULE}.values"][3, 1] = float("nan")


def _unmerge_foreign(tmp):
    weight = rand(OUT, IN)
    first, _ = build("columns")
    saved = build("rows")[0].merge_into(weight)
    first.unmerge_from(weight, saved)


CASES = [
    Case("delta-index-out-of-range", _read, AdapterLoadError, (MODULE, "index must lie in [0, 23)", "re-save"),
         _bad_file(_set("index", torch.tensor([0, 5, 23]))),
         tries="a delta file whose column index lies past the matrix", before="new"),
    Case("delta-index-duplicate", _read, AdapterLoadError, (MODULE, "holds a position twice", "re-save"),
         _bad_file(_set("index", torch.tensor([0, 5, 5]))),
         tries="a delta index holding a position twice", before="new"),
    Case("delta-index-not-integer", _read, AdapterLoadError, (MODULE, "index must be an integer tensor"),
         _bad_file(_set("index", torch.tensor([0.0, 5.0, 22.0]))), tries="a float delta index", before="new"),
    Case("delta-values-wrong-shape", _read, AdapterLoadError, (MODULE, "values must have shape (37, 3)", "re-save"),
         _bad_file(_set("values", torch.zeros(OUT, 2))), tries="delta values of the wrong shape", before="new"),
    Case("delta-values-not-float", _read, AdapterLoadError, (MODULE, "values must be a floating-point tensor"),
         _bad_file(_set("values", torch.zeros(OUT, 3, dtype=torch.int32))), tries="integer delta values", before="new"),
    Case("delta-values-nan", _read, AdapterLoadError, (MODULE, "nan or inf", "lower learning rate"),
         _bad_file(_nan_values), tries="a NaN in a delta file", before="new"),
    Case("delta-tensor-missing", _read, AdapterLoadError, (MODULE, "lacks tensor", ".values", "re-save"),
         _bad_file(_drop_values), tries="a delta file missing its values tensor", before="new"),
    Case("delta-tensor-orphan", _read, AdapterLoadError, ("no row in the delta table", "layers.9", "re-save"),
         _bad_file(_orphan), tries="a tensor the delta table does not list", before="new"),
    Case("delta-kind-unknown", _read, AdapterLoadError, (MODULE, "unknown delta kind 'butterfly'", "upgrade subtune"),
         _bad_file(_meta(kind="butterfly")), tries="an unknown delta kind (`butterfly`)", before="new"),
    Case("delta-shape-malformed", _read, AdapterLoadError, (MODULE, "shape must be two positive ints"),
         _bad_file(_meta(shape=[OUT])), tries="a delta shape that is not two ints", before="new"),
    Case("delta-shape-too-small", _read, AdapterLoadError, (MODULE, "index must lie in [0, 20)"),
         _bad_file(_meta(shape=[OUT, 20])), tries="a delta shape too small for its index", before="new"),
    Case("delta-block-outside-grid", _read, AdapterLoadError, (MODULE, "row_blocks must lie in [0, 5)", "blocks of 8"),
         _blocks_file(_set("row_blocks", torch.tensor([0, 5]))), tries="a block outside the block grid", before="new"),
    Case("delta-block-listed-twice", _read, AdapterLoadError, (MODULE, "listed twice"),
         _blocks_file(lambda t, m: t.update({f"delta.{MODULE}.row_blocks": torch.tensor([4, 4]),
                                             f"delta.{MODULE}.col_blocks": torch.tensor([2, 2])})),
         tries="a block listed twice", before="new"),
    Case("delta-block-size-missing", _read, AdapterLoadError, (MODULE, "lacks 'block_size'"),
         _blocks_file(lambda t, m: m[MODULE].pop("block_size")),
         tries="a blocks delta without `block_size`", before="new"),
    Case("delta-lowrank-factors-mismatch", _read, AdapterLoadError, (MODULE, "a must have shape (3, 23)"),
         _lowrank_file(_set("A", torch.zeros(3, 22))), tries="low-rank factors whose shapes disagree", before="new"),
    Case("delta-lowrank-scale-not-finite", _read, AdapterLoadError, (MODULE, "scale must be a finite number"),
         _lowrank_file(lambda t, m: m[MODULE].update(scale="inf")), tries="a low-rank scale of `inf`", before="new"),
    Case("delta-table-not-json", _read, AdapterLoadError, ("delta table is not valid json", "re-save"),
         _bad_file(lambda t, m: None, table="{"), tries="a delta table that is not JSON", before="new"),
    Case("delta-table-missing", _read, AdapterLoadError, ("holds no delta table", "re-save"), _without_header,
         tries="a safetensors file without a delta table", before="new"),
    Case("delta-file-truncated", _read, AdapterLoadError, ("adapter.safetensors", "re-save"), _truncated,
         tries="a delta file cut short", before="new"),
    Case("delta-lora-over-cap", lambda tmp: build("columns")[0].to_lora(3, name=MODULE), ExportError,
         (MODULE, "needs lora rank 4", "max_rank=3", "fallback='svd'", "subtune.merge()"),
         tries="a delta needing LoRA rank 4 exported with `max_rank=3`", before="new"),
    Case("delta-lora-bad-fallback", lambda tmp: build("columns")[0].to_lora(8, fallback="truncate"), ExportError,
         ("fallback must be 'error' or 'svd'",), tries="`to_lora(fallback='truncate')`", before="new"),
    Case("delta-adapter-over-cap", lambda tmp: lora_factors({"a": build("rows")[0], MODULE: build("columns")[0]}, 2),
         ExportError, ("2 module(s)", f"largest: {MODULE} rank 4", "raise max_rank", "fallback='svd'"),
         tries="an adapter whose deltas exceed `max_rank`", before="new"),
    Case("delta-merge-wrong-weight", lambda tmp: build("sparse")[0].merge_into(torch.zeros(IN, OUT)), DeltaError,
         ("shape (37, 23)", "weight of shape (23, 37)", "pass the weight of the module"),
         tries="merge a delta into a weight of another shape", before="new"),
    Case("delta-unmerge-foreign-saved", _unmerge_foreign, DeltaError, ("not what this delta's merge_into returned",
                                                                       "pass that exact tensor"),
         tries="unmerge with a saved tensor another delta returned", before="new"),
    Case("delta-add-other-module", lambda tmp: build("dense")[0] + Delta.dense(torch.zeros(IN, OUT)), DeltaError,
         ("only deltas of the same module",), tries="add deltas of two different modules", before="new"),
    Case("delta-apply-wrong-input", lambda tmp: build("blocks")[0].apply(torch.zeros(4, OUT), torch.zeros(4, OUT)),
         DeltaError, ("apply needs x (..., 23)",), tries="apply a delta to an input of the wrong width", before="new"),
    Case("delta-empty-index", lambda tmp: Delta.columns([], torch.zeros(OUT, 0), (OUT, IN)), DeltaError,
         ("non-empty", "leave it out"), tries="a columns delta with no columns", before="new"),
]


@cases_param(CASES)
def test_catalogue_deltas(case, tmp_path):
    assert issubclass(case.error, SubtuneError)
    check_case(case, tmp_path)


def test_unchecked_read_keeps_nonfinite_values():
    """check_finite=False hands a diverged adapter to a caller that allows it (e.g. to inspect it)."""
    tensors, table = _good_tensors()
    _nan_values(tensors, table)
    deltas = deltas_from_tensors(tensors, table, check_finite=False)
    assert torch.isnan(deltas[MODULE].values).any()
