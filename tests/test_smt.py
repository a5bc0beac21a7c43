"""SMT against dense and brute-force references: block gradients, selection, memory saved, export, warm-up modes."""

import json

import pytest
import torch
from conftest import lm_loss, make_tiny, perturb_trainable

import subtune
from subtune.core.errors import ExportError
from subtune.methods.smt.select import total_blocks
from subtune.ops.block_sparse import BlockDeltaLinear

GQA_RAGGED = dict(hidden=32, heads=4, kv_heads=2, intermediate=44)  # k/v: 16×32; MLP width 44 = 5 blocks of 8 + 4


def batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (2, 8), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _block_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, BlockDeltaLinear)}


def test_model_gradients_equal_the_dense_gradient_masked_to_the_blocks(exact_norms):
    config = subtune.SMTConfig(block_size=8, num_blocks=10, mlp_num_blocks=8, warmup_steps=2)
    model = subtune.prepare(make_tiny(1, **GQA_RAGGED, dtype=torch.float64), config, calibration=batches(2))
    perturb_trainable(model, scale=0.1)
    layers = _block_layers(model)
    kinds = {n.rsplit(".", 1)[-1] for n in layers}
    assert {"k_proj", "v_proj"} & kinds and {"gate_proj", "up_proj", "down_proj"} & kinds
    dense = make_tiny(1, **GQA_RAGGED, dtype=torch.float64)
    with torch.no_grad():
        for name, layer in layers.items():
            dense.get_submodule(name).weight.add_(layer.dense_delta())
    for name, p in dense.named_parameters():
        p.requires_grad_(name in {f"{n}.weight" for n in layers})
    ids = batches(1, seed=9)[0]["input_ids"]
    loss, loss_ref = lm_loss(model, ids), lm_loss(dense, ids)
    torch.testing.assert_close(loss, loss_ref, atol=1e-12, rtol=0)
    loss.backward()
    loss_ref.backward()
    for name, layer in layers.items():
        reference = layer._grid(dense.get_submodule(name).weight.grad)[layer.rows, layer.cols]
        torch.testing.assert_close(layer.delta.grad, reference, atol=1e-10, rtol=0, msg=name)
    assert [n for n, p in model.named_parameters() if p.grad is not None and not n.endswith("delta")] == []


def _brute_force_selection(model_seed, calib, k, block):
    """Plain loops: summed gradients of q/k/v, |block mean| per (matrix, row block, col block), best k."""
    model = make_tiny(model_seed, **GQA_RAGGED, dtype=torch.float64)
    for name, p in model.named_parameters():
        p.requires_grad_(any(t in name for t in ("q_proj", "k_proj", "v_proj")))
    model.eval()
    for batch in calib:
        model(**batch).loss.backward()
    scored = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad
        for r in range(0, g.shape[0], block):
            for c in range(0, g.shape[1], block):
                scored.append((-abs(g[r:r + block, c:c + block].mean().item()), name.removesuffix(".weight"),
                               r // block, c // block))
    scored.sort(key=lambda s: s[0])
    return sorted((n, r, c) for _, n, r, c in scored[:k])


def test_selection_equals_a_brute_force_reference():
    calib = batches(3, seed=4)
    config = subtune.SMTConfig(block_size=8, num_blocks=7, warmup_steps=3)
    model = subtune.prepare(make_tiny(2, **GQA_RAGGED, dtype=torch.float64), config, calibration=calib)
    chosen = sorted((name.removesuffix(".blocks"), r, c) for name, rc in model.subtune_state.selection.tensors.items()
                    for r, c in rc.t().tolist())
    assert chosen == _brute_force_selection(2, calib, 7, 8)


def test_budget_ratio_counts_every_two_dimensional_block_of_the_model():
    model = make_tiny(0, hidden=32, intermediate=48, vocab=64)
    expected = sum(p.shape[0] / 16 * p.shape[1] / 16 for p in model.parameters() if p.dim() == 2)
    assert total_blocks(model, 16) == int(expected)
    prepared = subtune.prepare(model, subtune.SMTConfig(block_size=16, ratio=0.1, warmup_steps=1),
                               calibration=batches(1))
    assert sum(prepared.subtune_state.selection.info["blocks"].values()) == int(0.1 * int(expected))


def test_block_layer_saves_only_a_copy_of_the_column_blocks_it_reads():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 64, bias=False)
    layer = BlockDeltaLinear(base, rows=torch.tensor([0, 3]), cols=torch.tensor([1, 1]), block_size=16)
    x = torch.randn(4, 8, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x * 1.0)
    big = [t for t in saved if t.is_floating_point() and t.data_ptr() not in
           {base.weight.data_ptr(), layer.delta.data_ptr()}]
    assert [tuple(t.shape) for t in big] == [(32, 1, 16)]  # one column block of 16, for 4×8 tokens
    assert big[0].untyped_storage().nbytes() == 32 * 16 * 4
    y.sum().backward()
    assert layer.delta.grad.shape == (2, 16, 16) and base.weight.grad is None


def test_lora_export_rank_is_block_size_times_fewer_distinct_rows_or_cols(tmp_path):
    model = make_tiny(0, hidden=32, intermediate=48)
    subtune.prepare(model, subtune.SMTConfig(block_size=8, num_blocks=12, warmup_steps=1), calibration=batches(1))
    perturb_trainable(model)
    info = subtune.export_lora(model, tmp_path)
    for name, layer in _block_layers(model).items():
        distinct = min(layer.rows.unique().numel(), layer.cols.unique().numel())
        assert info["ranks"][name] == 8 * distinct
    assert info["exact"]


def test_rank_cap_raises_or_falls_back_to_svd_with_its_error(tmp_path):
    model = make_tiny(0, hidden=32, intermediate=48)
    subtune.prepare(model, subtune.SMTConfig(block_size=8, num_blocks=30, warmup_steps=1), calibration=batches(1))
    perturb_trainable(model)
    with pytest.raises(ExportError, match="fallback='svd'"):
        subtune.export_lora(model, tmp_path / "strict", max_rank=8)
    info = subtune.export_lora(model, tmp_path / "svd", max_rank=8, fallback="svd")
    assert not info["exact"] and info["max_rank"] == 8
    assert all(0 < e < 1 for e in info["svd_errors"].values())
    # the reported error is the real one
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "svd" / "adapter_model.safetensors")
    name, error = next(iter(info["svd_errors"].items()))
    approx = tensors[f"base_model.model.{name}.lora_B.weight"] @ tensors[f"base_model.model.{name}.lora_A.weight"]
    exact = _block_layers(model)[name].dense_delta()
    assert abs(float((exact - approx).norm() / exact.norm()) - error) < 1e-5


def test_warmup_updates_mode_changes_the_base_travels_with_the_adapter_and_refuses_lora(tmp_path, batch):
    config = subtune.SMTConfig(block_size=8, num_blocks=4, warmup_steps=3, warmup_updates=True, warmup_lr=1e-2)
    model = subtune.prepare(make_tiny(0), config, calibration=batches(3))
    embed = model.model.embed_tokens.weight
    assert not torch.equal(embed, make_tiny(0).model.embed_tokens.weight)  # full-FT steps moved every weight
    assert not embed.requires_grad
    perturb_trainable(model)
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"]).logits
    subtune.save(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["selection"]["warmup_mode"] == "updates"
    with torch.no_grad():
        reloaded = subtune.load(make_tiny(0), tmp_path)(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(reloaded, trained, atol=0, rtol=0)
    with pytest.raises(ExportError, match="not a pure update of the original base.*merged model"):
        subtune.export_lora(model, tmp_path / "lora")


def test_gradient_only_warmup_leaves_the_base_untouched_and_needs_no_optimizer_state():
    before = {k: v.clone() for k, v in make_tiny(0).state_dict().items()}
    model = subtune.prepare(make_tiny(0), subtune.SMTConfig(block_size=8, num_blocks=4, warmup_steps=3),
                            calibration=batches(3))
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if not k.endswith("delta")}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_missing_calibration_is_refused_before_any_change():
    model = make_tiny(0)
    with pytest.raises(subtune.SubtuneError, match="calibration"):
        subtune.prepare(model, subtune.SMTConfig(block_size=8, num_blocks=2))
    assert not hasattr(model, "subtune_state")
