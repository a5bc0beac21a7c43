"""SMT on matrices whose sides are not multiples of the block size: the edge blocks store b×b values, but the
trainable count, the trained update, the optimizer's moments and the saved adapter hold only the in-matrix part."""

import pytest
import torch

import subtune
from subtune.core.api import state_of
from subtune.methods.smt.config import ATTENTION, MLP
from conftest import make_tiny

BLOCK = 24  # hidden 32, KV rows 16, MLP width 40: every matrix has ragged edge blocks


def ragged_model():
    return make_tiny(0, hidden=32, heads=4, kv_heads=2, intermediate=40)


def targets(model, names):
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names}


def prepared(num_blocks: int, mlp_num_blocks: int, batch) -> torch.nn.Module:
    config = subtune.SMTConfig(block_size=BLOCK, num_blocks=num_blocks, mlp_num_blocks=mlp_num_blocks,
                               warmup_steps=1)
    return subtune.prepare(ragged_model(), config, calibration=[batch])


def train(model, batch, steps: int = 3) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # decay must not move the padding either
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def padding_masks(model) -> dict[str, torch.Tensor]:
    """{layer: bool (k, b, b)} True where a selected block lies outside its matrix."""
    out = {}
    for name, layer in state_of(model).method.layers(model).items():
        b = layer.block_size
        inside_rows = (layer.rows[:, None] * b + torch.arange(b)) < layer.out_features  # (k, b)
        inside_cols = (layer.cols[:, None] * b + torch.arange(b)) < layer.in_features
        out[name] = ~(inside_rows[:, :, None] & inside_cols[:, None, :])
    return out


def test_every_block_selected_counts_exactly_the_matrices_entries(batch):
    model = ragged_model()
    attention, mlp = targets(model, ATTENTION), targets(model, MLP)
    grid = {n: -(-m.out_features // BLOCK) * -(-m.in_features // BLOCK) for n, m in {**attention, **mlp}.items()}
    model = prepared(sum(grid[n] for n in attention), sum(grid[n] for n in mlp), batch)
    summary = subtune.trainable_summary(model)
    exact = sum(m.weight.numel() for m in {**attention, **mlp}.values())  # every entry of every target: reachable
    stored = sum(layer.delta.numel() for layer in state_of(model).method.layers(model).values())
    assert summary.trainable == exact < stored
    assert summary.optimizer_state_bytes == 8 * stored  # the bytes are what AdamW really holds, padding included


def test_the_count_equals_the_entries_training_moves_and_padding_stays_zero(tmp_path, batch):
    model = prepared(3, 4, batch)  # a global top-k: a mix of full and edge blocks
    masks = padding_masks(model)
    assert any(m.any() for m in masks.values()), "the selection must include edge blocks"
    optimizer = train(model, batch)
    method = state_of(model).method
    moved = sum(int((d.to_dense() != 0).sum()) for d in method.deltas(model, state_of(model)).values())
    assert subtune.trainable_summary(model).trainable == moved  # every reachable entry got a gradient and moved
    for name, layer in method.layers(model).items():
        pad = masks[name]
        assert torch.count_nonzero(layer.delta.detach()[pad]) == 0
        moments = optimizer.state[layer.delta]
        assert torch.count_nonzero(moments["exp_avg"][pad]) == 0
        assert torch.count_nonzero(moments["exp_avg_sq"][pad]) == 0
    subtune.save(model, tmp_path / "a")
    saved = subtune.read_deltas(tmp_path / "a")
    for name, pad in masks.items():
        assert torch.count_nonzero(saved[name].values[pad]) == 0
        assert torch.equal(saved[name].to_dense(), method.layers(model)[name].as_delta().to_dense())
    fresh = subtune.load(ragged_model(), tmp_path / "a")
    assert subtune.trainable_summary(fresh).trainable == moved


@pytest.mark.parametrize("block", [8, 16])
def test_block_sizes_that_divide_every_side_count_every_stored_value(block, batch):
    """No padding: the exact count is the stored count (what the summary said before edge blocks were counted)."""
    model = subtune.prepare(ragged_model(), subtune.SMTConfig(block_size=block, num_blocks=3, warmup_steps=1),
                            calibration=[batch])
    stored = sum(layer.delta.numel() for layer in state_of(model).method.layers(model).values())
    assert subtune.trainable_summary(model).trainable == stored == 3 * block * block
