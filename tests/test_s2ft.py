"""S²FT against dense references: layer outputs, masked gradients, memory saved by autograd, selection, export."""

import copy

import pytest
import torch
from conftest import lm_loss, make_tiny, perturb_trainable

import subtune
from subtune.core.errors import ExportError
from subtune.methods.s2ft.select import choose_units
from subtune.ops.sliced import INPUT_COLUMNS, OUTPUT_ROWS, SlicedDeltaLinear


def _dense_reference(layer: SlicedDeltaLinear) -> torch.nn.Linear:
    dense = copy.deepcopy(layer.base_layer)
    with torch.no_grad():
        dense.weight.add_(layer.dense_delta().to(dense.weight.dtype))
    dense.weight.requires_grad_(True)
    return dense


@pytest.mark.parametrize("kind", [INPUT_COLUMNS, OUTPUT_ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_matches_dense_layer_and_masked_dense_gradient(kind, bias):
    torch.manual_seed(0)
    base = torch.nn.Linear(37, 23, bias=bias).double()
    index = torch.tensor([0, 5, 6, 19, 22]) if kind == OUTPUT_ROWS else torch.tensor([1, 2, 17, 30, 36])
    layer = SlicedDeltaLinear(base, index, kind, dtype=torch.float64)
    with torch.no_grad():
        layer.delta.normal_()
    dense = _dense_reference(layer)
    x = torch.randn(3, 5, 37, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), dense(x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=0)
    dim = 1 if kind == INPUT_COLUMNS else 0
    torch.testing.assert_close(layer.delta.grad, dense.weight.grad.index_select(dim, layer.index), atol=1e-10, rtol=0)
    assert base.weight.grad is None and (base.bias is None or base.bias.grad is None)


MODEL_SHAPES = {
    "odd-mha": dict(hidden=36, heads=3, kv_heads=3, intermediate=50),
    "gqa-8-2-bias-headdim": dict(hidden=48, heads=8, kv_heads=2, head_dim=10, intermediate=40, bias=True),
}


def _s2ft_and_dense(shape_kwargs, config):
    model = make_tiny(3, **shape_kwargs, dtype=torch.float64)
    subtune.prepare(model, config)
    perturb_trainable(model, scale=0.1)
    dense = make_tiny(3, **shape_kwargs, dtype=torch.float64)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SlicedDeltaLinear)}
    with torch.no_grad():
        for name, layer in layers.items():
            dense.get_submodule(name).weight.add_(layer.dense_delta())
    for name, p in dense.named_parameters():
        p.requires_grad_(name in {f"{n}.weight" for n in layers})
    return model, dense, layers


@pytest.mark.parametrize("shape", sorted(MODEL_SHAPES))
def test_model_gradients_equal_the_dense_gradient_masked_to_the_slices(shape, batch, exact_norms):
    config = subtune.S2FTConfig(o_ratio=0.3, v_ratio=0.5, d_ratio=0.2, u_ratio=0.2, seed=1)
    model, dense, layers = _s2ft_and_dense(MODEL_SHAPES[shape], config)
    assert {type(m).__name__ for m in layers.values()} == {"SlicedDeltaLinear"}
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"o_proj", "v_proj", "down_proj", "up_proj"}
    loss, loss_ref = lm_loss(model, batch["input_ids"]), lm_loss(dense, batch["input_ids"])
    torch.testing.assert_close(loss, loss_ref, atol=1e-12, rtol=0)
    loss.backward()
    loss_ref.backward()
    for name, layer in layers.items():
        dense_grad = dense.get_submodule(name).weight.grad.index_select(layer.slice_dim, layer.index)
        torch.testing.assert_close(layer.delta.grad, dense_grad, atol=1e-10, rtol=0, msg=name)
    frozen_grads = [n for n, p in model.named_parameters() if p.grad is not None and not n.endswith("delta")]
    assert frozen_grads == []


def test_gqa_selection_respects_heads_and_explicit_head_dim():
    model = make_tiny(0, hidden=48, heads=8, kv_heads=2, head_dim=10, intermediate=40, layers=4, bias=True)
    subtune.prepare(model, subtune.S2FTConfig(o_ratio=0.25, v_ratio=0.5, d_ratio=0.1, seed=4))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SlicedDeltaLinear)}
    o_heads = v_heads = 0
    for name, layer in layers.items():
        idx = layer.index
        if name.endswith("o_proj"):  # whole query heads of size head_dim=10 (not hidden/heads=6)
            assert layer.kind == INPUT_COLUMNS and idx.numel() % 10 == 0 and idx.max() < 80
            assert all((block == block[0] + torch.arange(10)).all() and block[0] % 10 == 0 for block in idx.view(-1, 10))
            o_heads += idx.numel() // 10
        if name.endswith("v_proj"):  # whole KV heads only: 2 per layer, rows [g*10, g*10+10)
            assert layer.kind == OUTPUT_ROWS and idx.numel() % 10 == 0 and idx.max() < 20
            v_heads += idx.numel() // 10
    assert o_heads == int(4 * 8 * 0.25) and v_heads == int(4 * 2 * 0.5)


def test_gqa_models_default_to_down_only_and_mha_to_o_plus_down():
    gqa = subtune.prepare(make_tiny(0, layers=4, intermediate=64), subtune.S2FTConfig())
    assert gqa.subtune_state.selection.info["ratios"] == {"o_proj": 0.0, "v_proj": 0.0, "down_proj": 0.03,
                                                          "up_proj": 0.0}
    mha = subtune.prepare(make_tiny(0, kv_heads=4, layers=8, intermediate=64), subtune.S2FTConfig())
    assert mha.subtune_state.selection.info["units"] == {"o_proj": int(8 * 4 * 0.052), "down_proj": int(8 * 64 * 0.02)}


def test_selection_is_deterministic_for_a_seed_and_changes_with_it():
    def units(seed):
        m = subtune.prepare(make_tiny(0, layers=4), subtune.S2FTConfig(d_ratio=0.2, seed=seed))
        return {k: v.tolist() for k, v in m.subtune_state.selection.tensors.items()}
    assert units(0) == units(0) != units(1)


def test_uniform_allocation_gives_every_layer_the_same_count():
    rng = __import__("random").Random(0)
    chosen = choose_units(8, layers=4, units=10, allocation="uniform", rng=rng, scores=None, largest=True)
    assert [len(c) for c in chosen] == [2, 2, 2, 2]


def test_weight_strategy_picks_the_largest_or_smallest_norm_channels():
    model = make_tiny(0, layers=2, intermediate=48)
    with torch.no_grad():
        for li, layer in enumerate(model.model.layers):
            layer.mlp.down_proj.weight.mul_(0.01)
            layer.mlp.down_proj.weight[:, [3, 7, 11 + li]] *= 1000.0
    large = subtune.prepare(copy.deepcopy(model), subtune.S2FTConfig(d_ratio=3 / 48, strategy="weight",
                                                                     allocation="uniform"))
    assert [t.tolist() for t in large.subtune_state.selection.tensors.values()] == [[3, 7, 11], [3, 7, 12]]
    small = subtune.prepare(copy.deepcopy(model), subtune.S2FTConfig(d_ratio=3 / 48, strategy="weight",
                                                                     direction="small", allocation="uniform"))
    assert all(not {3, 7, 11, 12} & set(t.tolist()) for t in small.subtune_state.selection.tensors.values())


def test_activation_strategy_reads_the_trained_matrix_input(batch):
    model = make_tiny(0, layers=2, intermediate=48)
    calib = [batch]
    acts = {}
    hooks = [layer.mlp.down_proj.register_forward_hook(
        lambda m, i, o, li=li: acts.__setitem__(li, i[0].pow(2).sum((0, 1)).sqrt()))
        for li, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    for h in hooks:
        h.remove()
    prepared = subtune.prepare(model, subtune.S2FTConfig(d_ratio=4 / 48, strategy="activation",
                                                         allocation="uniform"), calibration=calib)
    for li, units in enumerate(prepared.subtune_state.selection.tensors.values()):
        assert sorted(units.tolist()) == sorted(torch.topk(acts[li], 4).indices.tolist())


def test_input_column_layer_saves_only_a_copy_of_the_selected_columns():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32, bias=False)
    index = torch.arange(0, 64, 8)  # 8 of 64 input columns
    layer = SlicedDeltaLinear(base, index, INPUT_COLUMNS)
    x = torch.randn(4, 16, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x * 1.0)  # x * 1.0: an activation, like the output of the previous layer
    activation_like = [t for t in saved if t.data_ptr() not in
                       {base.weight.data_ptr(), layer.delta.data_ptr(), layer.index.data_ptr()}]
    assert [tuple(t.shape) for t in activation_like] == [(4, 16, 8)]
    assert activation_like[0].untyped_storage().nbytes() == 4 * 16 * 8 * 4  # its own storage, not a view of x
    y.sum().backward()
    assert layer.delta.grad.shape == (32, 8)


def test_bf16_base_with_fp32_slice_matches_the_dense_bf16_layer():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48).to(torch.bfloat16)
    layer = SlicedDeltaLinear(base, torch.arange(10, 30), INPUT_COLUMNS)
    assert layer.delta.dtype == torch.float32 and base.weight.dtype == torch.bfloat16
    with torch.no_grad():
        layer.delta.normal_(0, 0.05)
    dense = _dense_reference(layer)  # bf16 weight with the delta added
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), dense(x), atol=0.05, rtol=0.02)
    layer(x).float().pow(2).sum().backward()
    dense(x).float().pow(2).sum().backward()
    assert layer.delta.grad.dtype == torch.float32
    torch.testing.assert_close(layer.delta.grad, dense.weight.grad[:, 10:30].float(), atol=0.5, rtol=0.05)


def test_bf16_merge_then_unmerge_restores_the_base_bit_for_bit():
    model = make_tiny(0, dtype=torch.bfloat16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    subtune.prepare(model, subtune.S2FTConfig(d_ratio=0.2, o_ratio=0.5))
    perturb_trainable(model, scale=1e-3)
    subtune.merge(model)
    subtune.unmerge(model)
    current = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    assert all(torch.equal(original[k], current[k]) for k in original)


def test_gradient_accumulation_over_two_micro_batches_equals_one_double_batch(exact_norms):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (4, 10), generator=gen)
    config = subtune.S2FTConfig(o_ratio=0.5, d_ratio=0.2)
    accumulated = subtune.prepare(make_tiny(0, dtype=torch.float64), config)
    double = subtune.prepare(make_tiny(0, dtype=torch.float64), config)
    for half in (ids[:2], ids[2:]):
        (lm_loss(accumulated, half) / 2).backward()
    lm_loss(double, ids).backward()
    grads = [(n, p.grad) for n, p in accumulated.named_parameters() if p.requires_grad]
    reference = dict((n, p.grad) for n, p in double.named_parameters() if p.requires_grad)
    assert grads
    for name, grad in grads:
        torch.testing.assert_close(grad, reference[name], atol=1e-12, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(batch, exact_norms):
    config = subtune.S2FTConfig(o_ratio=0.5, d_ratio=0.2)
    plain = subtune.prepare(make_tiny(0, dtype=torch.float64), config)
    checkpointed = subtune.prepare(make_tiny(0, dtype=torch.float64), config)
    checkpointed.gradient_checkpointing_enable()
    checkpointed.enable_input_require_grads()
    checkpointed.train()
    plain.train()
    lm_loss(plain, batch["input_ids"]).backward()
    lm_loss(checkpointed, batch["input_ids"]).backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        if p.requires_grad:
            assert q.grad is not None, name
            torch.testing.assert_close(q.grad, p.grad, atol=1e-12, rtol=0)


def test_export_refuses_ranks_above_the_cap(tmp_path):
    model = subtune.prepare(make_tiny(0, intermediate=48), subtune.S2FTConfig(d_ratio=0.5))
    with pytest.raises(ExportError, match="above max_rank=8"):
        subtune.export_lora(model, tmp_path, max_rank=8)
    assert not any(tmp_path.iterdir())


def test_exported_lora_uses_rank_as_alpha_and_one_hot_factors(tmp_path):
    import json

    from safetensors.torch import load_file

    model = subtune.prepare(make_tiny(0, kv_heads=4), subtune.S2FTConfig(o_ratio=0.5, u_ratio=0.1))
    perturb_trainable(model)
    info = subtune.export_lora(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for name, rank in info["ranks"].items():
        assert cfg["alpha_pattern"].get(name, cfg["lora_alpha"]) == cfg["rank_pattern"].get(name, cfg["r"]) == rank
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        one_hot = a if name.endswith("o_proj") else b.t()
        assert torch.equal(one_hot.sum(1), torch.ones(rank)) and set(one_hot.unique().tolist()) == {0.0, 1.0}


def test_unmodified_hf_trainer_trains_only_the_slices(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = subtune.prepare(make_tiny(0), subtune.S2FTConfig(o_ratio=0.5, d_ratio=0.3))
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 12), generator=gen)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=0.05,
                             report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                             max_grad_norm=1.0, gradient_accumulation_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(p.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
