"""LaMDA / LaMDA++: gradients vs a dense reference, what autograd keeps, B freezing under AdamW, rank allocation."""

import pytest
import torch
from conftest import CharTokenizer, lm_loss, make_tiny, perturb_trainable

import subtune
from subtune.methods.lamda import PMBFreezer
from subtune.methods.lamda.freeze import frozen_components
from subtune.methods.lamda.select import allocate_ranks
from subtune.ops.lowdim import LowDimLinear


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LowDimLinear)}


def test_gradients_of_s_and_b_equal_the_chain_rule_through_the_dense_weight(exact_norms, batch):
    model = subtune.prepare(make_tiny(0, dtype=torch.float64), subtune.LaMDAConfig(r=4, lora_alpha=8))
    perturb_trainable(model, scale=0.1)
    layers = _layers(model)
    dense = make_tiny(0, dtype=torch.float64)
    for name, p in dense.named_parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for name, layer in layers.items():
            dense.get_submodule(name).weight.add_(layer.delta_weight())
    for name in layers:
        dense.get_submodule(name).weight.requires_grad_(True)
    loss, loss_ref = lm_loss(model, batch["input_ids"]), lm_loss(dense, batch["input_ids"])
    torch.testing.assert_close(loss, loss_ref, atol=1e-12, rtol=0)
    loss.backward()
    loss_ref.backward()
    for name, layer in layers.items():
        g = dense.get_submodule(name).weight.grad  # dL/dW_eff, W_eff = W + s B S A
        s, a, b, core = layer.scaling, layer.lora_A, layer.lora_B.detach(), layer.lora_S.detach()
        torch.testing.assert_close(layer.lora_S.grad, s * b.t() @ g @ a.t(), atol=1e-10, rtol=0)
        torch.testing.assert_close(layer.lora_B.grad, s * g @ a.t() @ core.t(), atol=1e-10, rtol=0)
        assert layer.base_layer.weight.grad is None


def test_the_adapter_keeps_only_rank_sized_activations_never_the_input():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48).requires_grad_(False)  # the base is frozen, as after subtune.prepare
    layer = LowDimLinear(base, torch.randn(4, 64), torch.randn(48, 4), torch.randn(4, 4), scaling=0.5)
    x = torch.randn(3, 10, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x * 1.0)
    params = {p.data_ptr() for p in (base.weight, layer.lora_A, layer.lora_B, layer.lora_S)}
    activations = [tuple(t.shape) for t in saved if t.data_ptr() not in params]
    assert activations == [(30, 4), (30, 4)]  # h for ∂S and u for ∂B: r-dimensional; never x (30 × 64)
    y.sum().backward()
    layer.lora_B.requires_grad_(False)  # after B is frozen, u is no longer kept either
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x * 1.0)
    assert [tuple(t.shape) for t in saved if t.data_ptr() not in params] == [(30, 4)]


def test_schedule_freezes_one_component_every_horizon_over_r_steps():
    assert [frozen_components(s, rank=4, horizon=8) for s in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def _train(model, freezer, steps, lr=1e-2, weight_decay=0.1):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(0)
    history = []
    for step in range(1, steps + 1):
        ids = torch.randint(0, 64, (2, 8), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        freezer.after_step(optimizer, step)
        history.append({n: m.lora_B.detach().clone() for n, m in _layers(model).items()})
    return optimizer, history


def test_a_frozen_column_does_not_move_over_20_adamw_steps_with_weight_decay():
    model = subtune.prepare(make_tiny(0), subtune.LaMDAConfig(r=4))
    freezer = PMBFreezer(model, total_steps=100, freeze_steps=40)  # column 0 freezes at step 10, column 1 at 20
    _, history = _train(model, freezer, steps=30)
    for name in _layers(model):
        frozen_at_10 = history[9][name][:, 0]
        for later in history[10:30]:
            assert torch.equal(later[name][:, 0], frozen_at_10)
        assert not torch.equal(history[29][name][:, 3], history[10][name][:, 3])  # unfrozen columns still train


def test_after_full_freeze_b_has_no_gradient_and_no_optimizer_state():
    model = subtune.prepare(make_tiny(0), subtune.LaMDAConfig(r=2))
    freezer = PMBFreezer(model, total_steps=20, freeze_fraction=0.3)  # fully frozen at step 6
    optimizer, history = _train(model, freezer, steps=10)
    assert freezer.all_frozen()
    for name, layer in _layers(model).items():
        b = layer.lora_B
        assert not b.requires_grad and b.grad is None and b not in optimizer.state
        assert all(b is not p for g in optimizer.param_groups for p in g["params"])
        assert torch.equal(history[5][name], history[9][name])
        assert layer.lora_S in optimizer.state  # S keeps training
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.lora_B.grad is None and layer.lora_S.grad is not None for layer in _layers(model).values())


def test_trainer_callback_freezes_b_during_hf_training(tmp_path):
    from transformers import TrainingArguments

    from subtune.train.trainer import build_trainer

    model = subtune.prepare(make_tiny(0), subtune.LaMDAConfig(r=2, freeze_fraction=0.5))
    tok = CharTokenizer()
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(16)]
    trainer = build_trainer(model, tok, records, tmp_path, max_steps=6, batch_size=4, learning_rate=1e-2,
                            save_steps=100, progress=False)
    assert isinstance(trainer.args, TrainingArguments)
    trainer.train()
    assert all(not layer.lora_B.requires_grad for layer in _layers(model).values())
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert not any(layer.lora_B in inner.state for layer in _layers(model).values())


def _matrix_with_spectrum(singular_values, out=16, inp=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, out, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(inp, inp, generator=gen))
    s = torch.zeros(out, inp)
    s[range(len(singular_values)), range(len(singular_values))] = torch.tensor(singular_values)
    return u @ s @ v.t()


def test_lamda_plus_plus_ranks_sum_to_the_budget_and_follow_the_spectrum():
    flat = torch.linalg.svdvals(_matrix_with_spectrum([1.0] * 16))
    peaked = torch.linalg.svdvals(_matrix_with_spectrum([10.0, 1.0] + [0.01] * 14))
    medium = torch.linalg.svdvals(_matrix_with_spectrum([3.0, 2.0, 2.0, 1.5] + [0.1] * 12))
    ranks = allocate_ranks({"flat": flat, "peaked": peaked, "medium": medium}, budget=12, rank_min=1, rank_max=16,
                           multiple=1)
    assert sum(ranks.values()) == 12
    # pooled energy: peaked keeps 1 (its σ1 carries 99%), medium keeps its 4 large ones, flat gets the rest
    assert ranks == {"peaked": 1, "medium": 4, "flat": 7}
    chunked = allocate_ranks({"flat": flat, "peaked": peaked}, budget=8, rank_min=2, rank_max=8, multiple=2)
    assert sum(chunked.values()) == 8 and all(r % 2 == 0 and 2 <= r <= 8 for r in chunked.values())


def test_lamda_plus_plus_allocation_is_saved_and_printed_per_layer(tmp_path):
    model = subtune.prepare(make_tiny(0), subtune.LaMDAPlusConfig(r=4, rank_min=2, rank_max=16, rank_multiple=2))
    ranks = model.subtune_state.selection.info["ranks"]
    assert sum(ranks.values()) == 4 * len(ranks) and len(set(ranks.values())) > 1
    assert all(_layers(model)[n].rank == r for n, r in ranks.items())
    subtune.save(model, tmp_path)
    assert subtune.read_adapter_config(tmp_path)["selection"]["ranks"] == ranks


def test_rank_above_the_layer_size_is_refused():
    with pytest.raises(subtune.ConfigError, match="exceeds min"):
        subtune.prepare(make_tiny(0), subtune.LaMDAConfig(r=40))
