"""The method layers in subtune.ops state their update as a Delta (`as_delta()`), and the one generic merge/unmerge
in WrappedLinear built on it: merged logits equal unmerged ones, unmerge restores the base bit for bit (fp32 and
bf16), and the layer keeps nothing but the saved original entries."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny, perturb_trainable
from method_cases import CASES
from torch import nn

import subtune
from reliability import Case, cases_param, check_case
from subtune.core.deltas import Delta, DeltaError
from subtune.ops.base import WrappedLinear
from subtune.ops.block_sparse import BlockDeltaLinear
from subtune.ops.lowdim import LowDimLinear
from subtune.ops.sliced import INPUT_COLUMNS, OUTPUT_ROWS, SlicedDeltaLinear

OUT, IN, BS = 37, 23, 8  # a 5x3 grid of 8x8 blocks with ragged last block-row (5) and block-column (7)
COLUMNS, ROWS = [22, 0, 5, 11], [36, 0, 17]
ROW_BLOCKS, COL_BLOCKS = [4, 4, 1, 0], [2, 0, 2, 1]  # (4, 2) is ragged both ways
RANK, SCALING = 3, 0.5
LAYER_KINDS = ["columns", "rows", "blocks", "lowrank"]
DTYPES = [torch.float32, torch.bfloat16]


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                                dtype=torch.float64)).to(dtype)


def base(dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(IN, OUT).to(dtype).requires_grad_(False)  # frozen, as prepare() leaves it
    with torch.no_grad():
        layer.bias.normal_(0, 0.1)
    return layer


def make(kind: str, dtype=torch.float32) -> WrappedLinear:
    """A layer of `kind` on a `dtype` base, its trainable values moved as training would (small, random)."""
    if kind == "columns":
        layer = SlicedDeltaLinear(base(dtype), torch.tensor(COLUMNS), INPUT_COLUMNS)
    elif kind == "rows":
        layer = SlicedDeltaLinear(base(dtype), torch.tensor(ROWS), OUTPUT_ROWS)
    elif kind == "blocks":
        layer = BlockDeltaLinear(base(dtype), torch.tensor(ROW_BLOCKS), torch.tensor(COL_BLOCKS), BS)
    else:
        a, b = rand(RANK, IN, seed=1, scale=IN ** -0.5), rand(OUT, RANK, seed=2, scale=0.1)  # SVD-like sizes
        layer = LowDimLinear(base(dtype), a, b, torch.eye(RANK), SCALING)
    with torch.no_grad():
        for i, p in enumerate(p for p in layer.parameters() if p.requires_grad):
            p.add_(rand(*p.shape, dtype=p.dtype, seed=10 + i, scale=0.05))
    return layer


def reference_update(layer: WrappedLinear, dtype=torch.float64) -> torch.Tensor:
    """The (out, in) update in `dtype`, built by hand from the layer's own parameters (s · (B S) A for LowDim)."""
    ref = torch.zeros(OUT, IN, dtype=dtype)
    if isinstance(layer, SlicedDeltaLinear):
        values = layer.delta.detach().double()
        for j, position in enumerate(layer.index.tolist()):
            if layer.kind == INPUT_COLUMNS:
                ref[:, position] = values[:, j].to(dtype)
            else:
                ref[position, :] = values[j].to(dtype)
    elif isinstance(layer, BlockDeltaLinear):
        for i, (rb, cb) in enumerate(zip(layer.rows.tolist(), layer.cols.tolist())):
            block = ref[rb * BS: rb * BS + BS, cb * BS: cb * BS + BS]  # clipped at the ragged edges
            block += layer.delta.detach()[i, : block.shape[0], : block.shape[1]].to(dtype)
    else:
        ref = layer.scaling * ((layer.lora_B.detach().to(dtype) @ layer.lora_S.detach().to(dtype))
                               @ layer.lora_A.to(dtype))
    return ref


SAVED_ENTRIES = {"columns": OUT * len(COLUMNS), "rows": len(ROWS) * IN, "blocks": 5 * 7 + 5 * 8 + 8 * 7 + 8 * 8,
                 "lowrank": OUT * IN}


# --------------------------------------------------------------------------------------------------- as_delta()
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_as_delta_states_the_update_in_the_base_weight_coordinates(kind):
    layer = make(kind)
    delta = layer.as_delta()
    assert isinstance(delta, Delta) and delta.kind == kind and delta.shape == (OUT, IN)
    exact = kind != "lowrank"  # the support kinds copy values; B S is an fp32 product (rounded)
    torch.testing.assert_close(delta.to_dense(torch.float64), reference_update(layer), atol=0 if exact else 1e-6,
                               rtol=0)
    assert all(not t.requires_grad for t in delta.to_tensors("m").values())  # detached
    shared = {"columns": "delta", "rows": "delta", "blocks": "delta", "lowrank": "lora_A"}[kind]
    stored = delta.values if kind != "lowrank" else delta.A
    assert stored.data_ptr() == getattr(layer, shared).data_ptr()  # shares storage: no copy of the values
    if kind == "lowrank":
        assert delta.scale == SCALING and delta.rank == RANK


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_as_delta_forward_equals_the_layer_forward(kind):
    """delta.apply over the untouched base computes what the training layer computes."""
    layer = make(kind)
    x = rand(2, 5, IN, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(layer.as_delta().apply(x, base()(x)), layer(x), atol=1e-6, rtol=0)


def test_dense_helpers_keep_their_numbers():
    """dense_delta / delta_weight (used by SMT and the tests) are the delta's dense form, in the values' dtype."""
    for kind in LAYER_KINDS:
        layer = make(kind)
        dense = layer.delta_weight() if kind == "lowrank" else layer.dense_delta()
        assert dense.dtype == torch.float32 and dense.shape == (OUT, IN)
        torch.testing.assert_close(dense.double(), reference_update(layer), atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------- merge / unmerge
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_then_unmerge_restores_the_base_bit_for_bit(kind, dtype):
    layer = make(kind, dtype)
    weight = layer.base_layer.weight
    before = weight.detach().clone()
    x = rand(2, 5, IN, dtype=dtype, seed=3)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged
        # rounded once: base + update summed in fp32, then cast to the weight's dtype
        expected = (before.float() + reference_update(layer, torch.float32)).to(dtype)
        assert torch.equal(weight, expected)
        merged = layer(x)
        assert torch.equal(merged, F.linear(x, expected, layer.base_layer.bias))  # the update term is skipped
        if dtype == torch.float32:
            torch.testing.assert_close(merged, unmerged, atol=1e-6, rtol=0)
        else:  # bf16: the merged weight is rounded; stay within a few bf16 ulps of the outputs (|y| ~ 1)
            torch.testing.assert_close(merged.float(), unmerged.float(), atol=3e-2, rtol=0)
        layer.merge()  # a second merge is a no-op
        assert torch.equal(weight, expected)
        layer.unmerge()
        assert not layer.merged
        assert torch.equal(weight, before) and weight.dtype == dtype
        assert torch.equal(layer(x), unmerged)
        layer.unmerge()  # a second unmerge is a no-op
        assert torch.equal(weight, before)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_keeps_only_the_saved_entries(kind):
    """What the layer holds while merged: the original entries merge_into returned, nothing else, never saved."""
    layer = make(kind, torch.bfloat16)
    attributes, keys = set(vars(layer)), set(layer.state_dict())
    layer.merge()
    assert set(vars(layer)) - attributes == {"_merge_saved"}
    saved = layer._merge_saved
    assert saved.numel() == SAVED_ENTRIES[kind] and saved.dtype == torch.bfloat16
    assert set(layer.state_dict()) == keys  # not a buffer: a saved adapter never holds it
    layer.unmerge()
    assert layer._merge_saved is None


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_unmerge_is_exact_even_after_the_values_change(kind):
    """unmerge restores from the saved entries, not by subtracting the (possibly edited) update."""
    layer = make(kind, torch.bfloat16)
    before = layer.base_layer.weight.detach().clone()
    layer.merge()
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.mul_(3.0)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, before)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_unloaded_is_a_plain_linear_computing_the_layer(kind):
    layer = make(kind)
    x = rand(2, 5, IN, seed=3)
    with torch.no_grad():
        expected = layer(x)
        plain = layer.unloaded()
        assert type(plain) is nn.Linear
        torch.testing.assert_close(plain(x), expected, atol=1e-6, rtol=0)


def test_a_layer_without_as_delta_cannot_be_built():
    class Bare(WrappedLinear):
        def __init__(self):
            super().__init__()
            self.base_layer = base()

    with pytest.raises(TypeError, match="abstract.*as_delta"):
        Bare()


def test_the_dense_and_sparse_layer_keeps_its_own_merge():
    """SensZOQ's layer overrides merge/unmerge/merged/unloaded; the generic base must not get in its way."""
    from subtune.ops.sparse import DenseAndSparseLinear

    layer = DenseAndSparseLinear(base(), torch.tensor([0, 40, 77, 850]), quantize="none")
    with torch.no_grad():
        layer.values.add_(0.1)
    x = rand(2, 5, IN, seed=3)
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
        layer.unmerge()
        assert not layer.merged
        assert torch.equal(layer(x), expected)
        torch.testing.assert_close(layer.unloaded()(x), expected, atol=1e-6, rtol=0)


def test_the_dense_and_sparse_layer_states_its_update_against_the_plain_base():
    """as_delta = values - the plain base's entries at the positions (not the zeros D holds there), and a model
    cast to bf16 afterwards still measures from the fp32 originals; restore_delta is its inverse."""
    from subtune.ops.sparse import DenseAndSparseLinear

    plain = base()
    flat = torch.tensor([0, 40, 77, 850])
    layer = DenseAndSparseLinear(plain, flat, quantize="none")
    assert torch.equal(layer.as_delta().to_dense(torch.float64), torch.zeros(OUT, IN, dtype=torch.float64))
    moved = rand(4, seed=5, scale=0.1)
    with torch.no_grad():
        layer.values.add_(moved)
    expected = torch.zeros(OUT * IN, dtype=torch.float64)
    expected[flat] = (layer.values.detach().double() - plain.weight.detach().reshape(-1)[flat].double())
    torch.testing.assert_close(layer.as_delta().to_dense(torch.float64), expected.view(OUT, IN), atol=0, rtol=0)
    record = layer.as_delta()
    trained = layer.values.detach().clone()
    layer.to(torch.bfloat16)  # the originals are a plain attribute: not rounded by the cast
    assert layer.original_values.dtype == torch.float32
    with torch.no_grad():
        layer.values.zero_()
    layer.restore_delta(record)
    assert torch.equal(layer.values.detach().float(), trained.to(layer.values.dtype).float())


# ------------------------------------------------------------------------------------------- whole bf16 models
@pytest.mark.parametrize("method_id", ["s2ft", "smt-mlp-ragged", "lamda", "lamda-identity-residual"])
def test_bf16_model_merge_then_unmerge_restores_every_weight(method_id, batch):
    model = make_tiny(0, dtype=torch.bfloat16)
    model = subtune.prepare(model, CASES[method_id]["config"](), calibration=[batch, batch])
    perturb_trainable(model, scale=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(input_ids=batch["input_ids"]).logits
    subtune.merge(model)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the merge is visible
    subtune.unmerge(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, unmerged)


# --------------------------------------------------------------------------------------- bad inputs (catalogue)
def _cast_after_merge(tmp):
    layer = make("columns")
    layer.merge()
    layer.to(torch.bfloat16)
    layer.unmerge()


CASES_LAYERS = [
    Case("unmerge-after-cast", _cast_after_merge, DeltaError,
         ("cast from torch.float32 to torch.bfloat16", "cast the model back to torch.float32", "reload"),
         tries="unmerge after the merged model was cast to bf16",
         before="silent: LaMDA restored a base rounded to bf16; the other layers raised a raw PyTorch error"),
]


@cases_param(CASES_LAYERS)
def test_catalogue_layer_merge(case, tmp_path):
    check_case(case, tmp_path)


def test_a_refused_unmerge_leaves_the_layer_merged():
    layer = make("blocks")
    layer.merge()
    merged_weight = layer.base_layer.weight.detach().clone()
    layer.to(torch.bfloat16)
    with pytest.raises(DeltaError):
        layer.unmerge()
    assert layer.merged and torch.equal(layer.base_layer.weight, merged_weight.to(torch.bfloat16))
    layer.to(torch.float32)  # the fix the message names: cast back, then unmerge (bf16 round trip of the weight)
    layer.unmerge()
    assert not layer.merged
