"""SensZOQ and MeZO: the SPSA step against an explicit reference, the sensitive mask against brute force, the
dense-and-sparse layer against dequantised weights, and training through the HF Trainer."""

import json
import math

import pytest
import torch
from conftest import CharTokenizer, make_tiny

import subtune
from subtune.ops.sparse import DenseAndSparseLinear, dequantized_weight
from subtune.ops.zo import _noise, replay, spsa_step


def _quadratic(tensors, targets):
    return lambda: sum(((t.double() - c) ** 2).sum() for t, c in zip(tensors, targets))


@pytest.mark.parametrize("seeds", [[11], [11, 12, 13]])
def test_spsa_step_equals_an_explicit_reference_with_stored_z(seeds):
    torch.manual_seed(0)
    tensors = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    targets = [torch.randn(5, 3).double(), torch.randn(7).double()]
    start = [t.clone() for t in tensors]
    eps, lr = 1e-3, 0.05
    # reference: draw and store z explicitly, then do the textbook estimator
    zs = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        zs.append([_noise(t, gen) for t in start])
    loss = _quadratic(start, targets)
    expected = [t.double().clone() for t in start]
    for z in zs:
        plus = [s + eps * zi for s, zi in zip(start, z)]
        minus = [s - eps * zi for s, zi in zip(start, z)]
        g = (float(_quadratic(plus, targets)()) - float(_quadratic(minus, targets)())) / (2 * eps)
        expected = [e - lr * g * zi.double() / len(seeds) for e, zi in zip(expected, z)]
    out = spsa_step(tensors, _quadratic(tensors, targets), seeds, eps, lr)
    for t, e in zip(tensors, expected):
        torch.testing.assert_close(t, e, atol=1e-12, rtol=0)
    assert len(out["projected_grads"]) == len(seeds) and out["loss"] > 0
    assert float(loss()) > float(_quadratic(tensors, targets)())  # it went downhill


def test_a_zo_step_changes_only_the_sparse_values_and_restores_exactly(batch):
    model = subtune.prepare(make_tiny(0), subtune.SensZOConfig(density=0.05, quantize="none", mask_source="magnitude"))
    method = model.subtune_state.method
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("values")}
    values = [v.clone() for v in method.zo_tensors(model)]
    from subtune.train.zo import fp32_lm_loss

    spsa_step(method.zo_tensors(model), lambda: fp32_lm_loss(model, batch), [5], 1e-3, lr=0.0)
    assert all(torch.equal(a, b) for a, b in zip(values, method.zo_tensors(model)))  # lr 0: exact restore
    spsa_step(method.zo_tensors(model), lambda: fp32_lm_loss(model, batch), [5], 1e-3, lr=1e-2)
    assert all(not torch.equal(a, b) for a, b in zip(values, method.zo_tensors(model)))
    after = {k: v for k, v in model.state_dict().items() if not k.endswith("values")}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # every untouched entry is bit-identical


def test_sensitive_mask_equals_brute_force_per_sample_squared_gradients():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (3, 7), generator=gen)
    calib = [{"input_ids": ids, "labels": ids}]
    config = subtune.SensZOConfig(density=0.01, quantize="none", calibration_samples=3,
                                  target_modules=["q_proj", "down_proj"])
    model = subtune.prepare(make_tiny(0), config, calibration=calib)
    reference = make_tiny(0)
    names = [n for n, _ in reference.named_modules() if n.endswith(("q_proj", "down_proj"))]
    fisher = {n: torch.zeros_like(reference.get_submodule(n).weight) for n in names}
    reference.eval()
    for i in range(3):  # one backward per sample, square, sum
        reference.zero_grad()
        reference(input_ids=ids[i:i + 1], labels=ids[i:i + 1]).loss.backward()
        for n in names:
            fisher[n] += reference.get_submodule(n).weight.grad ** 2
    for n in names:
        k = math.ceil(0.01 * fisher[n].numel())
        expected = sorted(torch.argsort(fisher[n].flatten(), descending=True)[:k].tolist())
        assert model.subtune_state.selection.tensors[f"{n}.index"].tolist() == expected


def test_nf4_dense_part_plus_sparse_equals_dequantized_weight_plus_sparse():
    torch.manual_seed(0)
    base = torch.nn.Linear(128, 64)
    flat = torch.randperm(128 * 64)[:40]
    layer = DenseAndSparseLinear(base, flat, quantize="nf4")
    deq = dequantized_weight(layer.dense)
    assert torch.equal(deq.reshape(-1)[flat], torch.zeros(40))  # sensitive entries are not in the 4-bit part
    assert torch.equal(layer.values, base.weight.detach().reshape(-1)[flat.sort().values])
    off_mask = torch.ones(128 * 64, dtype=torch.bool)
    off_mask[flat] = False
    # NF4 keeps the rest within its quantisation error (≤ half a code step of each block's absmax)
    err = (deq.reshape(-1)[off_mask] - base.weight.detach().reshape(-1)[off_mask]).abs().max()
    assert err < 0.2 * base.weight.abs().max()
    x = torch.randn(4, 128)
    with torch.no_grad():
        reference = x @ layer.effective_weight().t() + base.bias
        torch.testing.assert_close(layer(x), reference, atol=2e-2, rtol=1e-2)
        unquantised = DenseAndSparseLinear(base, flat, quantize="none")
        torch.testing.assert_close(unquantised(x), base(x), atol=1e-6, rtol=0)


def test_senszo_on_a_4bit_base_trains_with_the_hf_trainer_and_replays(tmp_path):
    from subtune.train.trainer import build_trainer

    model = make_tiny(0, hidden=64, intermediate=128, heads=4, kv_heads=2)
    config = subtune.SensZOConfig(density=0.01, mask_source="magnitude", quantize="nf4", eps=1e-2)
    subtune.prepare(model, config)
    assert all(type(m.dense).__name__ == "Linear4bit" for m in model.modules() if isinstance(m, DenseAndSparseLinear))
    initial = [v.clone() for v in model.subtune_state.method.zo_tensors(model)]
    tok = CharTokenizer()
    records = [{"instruction": f"say {i}", "output": f"value {i % 3}"} for i in range(16)]
    trainer = build_trainer(model, tok, records, tmp_path, max_steps=4, batch_size=4, learning_rate=1e-3,
                            save_steps=2, progress=False)
    assert type(trainer).__name__ == "ZOTrainer"
    trainer.train()
    history = json.loads((tmp_path / "checkpoint-4" / "zo_history.json").read_text())
    assert [h["step"] for h in history] == [0, 1, 2, 3]
    final = model.subtune_state.method.zo_tensors(model)
    assert any(not torch.equal(a, b) for a, b in zip(initial, final))
    replayed = [v.clone() for v in initial]
    replay(replayed, history, lambda step: history[step]["lr"])
    for a, b in zip(replayed, final):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (tmp_path / "checkpoint-4" / "adapter" / "adapter.safetensors").is_file()


def test_mezo_perturbs_every_weight_and_restores_by_regeneration(batch):
    model = subtune.prepare(make_tiny(0), subtune.MeZOConfig())
    method = model.subtune_state.method
    before = [t.clone() for t in method.zo_tensors(model)]
    from subtune.train.zo import fp32_lm_loss

    spsa_step(method.zo_tensors(model), lambda: fp32_lm_loss(model, batch), [1], 1e-3, lr=0.0, exact_restore=False)
    drift = max(float((a - b).abs().max()) for a, b in zip(before, method.zo_tensors(model)))
    assert drift < 1e-6  # fp32: regeneration restores to rounding
    spsa_step(method.zo_tensors(model), lambda: fp32_lm_loss(model, batch), [1], 1e-3, lr=1e-3, exact_restore=False)
    assert all(not torch.equal(a, b) for a, b in zip(before, method.zo_tensors(model)))


def test_choice_objective_is_cross_entropy_over_candidate_mean_log_likelihoods():
    from subtune.data.loaders import ChoiceCollator, encode_choice_record
    from subtune.train.zo import choice_loss

    tok = CharTokenizer(keep_last=12)
    records = [{"instruction": "pick", "output": "the answer is Ostra", "answer": "Ostra",
                "choices": ["Brask", "Ostra", "Umber"]},
               {"instruction": "pick2", "output": "Tesk", "answer": "Tesk", "choices": ["Tesk", "Ivory"]}]
    batch = ChoiceCollator(0)([encode_choice_record(tok, r) for r in records])
    assert batch["input_ids"].shape[0] == 5 and batch["gold"].tolist() == [1, 0]
    model = make_tiny(0)
    with torch.no_grad():
        loss = choice_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        scores = []
        for i in range(5):  # reference: per candidate, mean log p of its labelled tokens, one at a time
            lp, n = 0.0, 0
            for t in range(batch["input_ids"].shape[1] - 1):
                label = int(batch["labels"][i, t + 1])
                if label != -100:
                    lp += float(torch.log_softmax(logits[i, t], -1)[label])
                    n += 1
            scores.append(lp / n)
    first = -torch.log_softmax(torch.tensor(scores[:3]), 0)[1]
    second = -torch.log_softmax(torch.tensor(scores[3:]), 0)[0]
    assert abs(float(loss) - float((first + second) / 2)) < 1e-5
