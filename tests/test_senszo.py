"""SensZOQ and MeZO: the SPSA step against an explicit reference, the sensitive mask against brute force, the
dense-and-sparse layer against dequantised weights, and training through the HF Trainer."""

import copy
import json
import math

import pytest
import torch
from conftest import CharTokenizer, make_tiny, perturb_trainable

import subtune
from subtune.ops.sparse import DenseAndSparseLinear, dequantized_weight, quantize_nf4
from subtune.ops.zo import _noise, replay, spsa_step
from subtune.train.zo import fp32_lm_loss


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
    values = [v.clone() for v in method.zo_tensors(model, model.subtune_state)]
    from subtune.train.zo import fp32_lm_loss

    spsa_step(method.zo_tensors(model, model.subtune_state), lambda: fp32_lm_loss(model, batch), [5], 1e-3, lr=0.0)
    assert all(torch.equal(a, b) for a, b in zip(values, method.zo_tensors(model, model.subtune_state)))  # lr 0: exact restore
    spsa_step(method.zo_tensors(model, model.subtune_state), lambda: fp32_lm_loss(model, batch), [5], 1e-3, lr=1e-2)
    assert all(not torch.equal(a, b) for a, b in zip(values, method.zo_tensors(model, model.subtune_state)))
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
    initial = [v.clone() for v in model.subtune_state.method.zo_tensors(model, model.subtune_state)]
    tok = CharTokenizer()
    records = [{"instruction": f"say {i}", "output": f"value {i % 3}"} for i in range(16)]
    trainer = build_trainer(model, tok, records, tmp_path, max_steps=4, batch_size=4, learning_rate=1e-3,
                            save_steps=2, progress=False)
    from subtune.train.zo import ZOTrainer

    assert isinstance(trainer, ZOTrainer)
    trainer.train()
    history = json.loads((tmp_path / "checkpoint-4" / "zo_history.json").read_text())
    assert [h["step"] for h in history] == [0, 1, 2, 3]
    final = model.subtune_state.method.zo_tensors(model, model.subtune_state)
    assert any(not torch.equal(a, b) for a, b in zip(initial, final))
    replayed = [v.clone() for v in initial]
    replay(replayed, history, lambda step: history[step]["lr"])
    for a, b in zip(replayed, final):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (tmp_path / "checkpoint-4" / "adapter" / "adapter.safetensors").is_file()


def test_mezo_perturbs_every_weight_and_restores_by_regeneration(batch):
    model = subtune.prepare(make_tiny(0), subtune.MeZOConfig())
    method = model.subtune_state.method
    before = [t.clone() for t in method.zo_tensors(model, model.subtune_state)]
    from subtune.train.zo import fp32_lm_loss

    spsa_step(method.zo_tensors(model, model.subtune_state), lambda: fp32_lm_loss(model, batch), [1], 1e-3, lr=0.0, exact_restore=False)
    drift = max(float((a - b).abs().max()) for a, b in zip(before, method.zo_tensors(model, model.subtune_state)))
    assert drift < 1e-6  # fp32: regeneration restores to rounding
    spsa_step(method.zo_tensors(model, model.subtune_state), lambda: fp32_lm_loss(model, batch), [1], 1e-3, lr=1e-3, exact_restore=False)
    assert all(not torch.equal(a, b) for a, b in zip(before, method.zo_tensors(model, model.subtune_state)))


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


# --------------------------------------------------------------------------------------------- NF4 layout (issue 10)

def _reference_packed_kernel(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    """What bitsandbytes' fused AVX512-BF16 kernel computes on a repacked weight: input and block scales in bf16,
    codes from the repacked layout (undone with bitsandbytes' own inverse), a bf16 matmul."""
    import bitsandbytes.functional as bf

    scratch = copy.copy(state)
    scratch.original_nested = False
    codes, _ = bf._convert_weight_packed_for_cpu_inverse(B, scratch)
    absmax = state.absmax.T.reshape(-1).float()
    w = torch.ops.bitsandbytes.dequantize_4bit.default(codes, absmax, state.blocksize, state.quant_type,
                                                       list(state.shape), torch.bfloat16)
    return torch.nn.functional.linear(A.to(torch.bfloat16), w).to(A.dtype)


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """bitsandbytes as it behaves on a CPU with AVX512-BF16 (where issue 10 was found; this runner may lack it):
    every Linear4bit built from now on repacks its weight on its first eval-mode no-grad forward, with bitsandbytes'
    own repacking code, then runs the fused kernel (the real one where the CPU has it, else the reference above)."""
    import bitsandbytes.functional as bf
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    if not bf.has_avx512bf16():
        monkeypatch.setattr(bf, "gemv_4bit", _reference_packed_kernel)


def _nf4_senszo(dtype, hidden, intermediate):
    model = make_tiny(0, hidden=hidden, intermediate=intermediate, heads=4, kv_heads=2, dtype=dtype)
    subtune.prepare(model, subtune.SensZOConfig(density=0.01, mask_source="magnitude", quantize="nf4"))
    perturb_trainable(model)  # non-trivial sparse values, as after training
    return model


# Tolerances of merged vs trained logits. fp32: summation order only (seen 4e-7). bf16: the unmerged layer rounds
# x·Dᵀ to bf16 before adding the sparse term, the merged one rounds D + S once; about one bf16 ulp (2^-8 relative)
# per layer, seen 0.0066·max|logit|; asserted 2^-5·max|logit|. Today's code is off by ~100% of the logits (bf16) or
# fails with a dtype error (fp32) -- and NF4's own rounding (~10% of a block's scale) is far larger than either.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hidden,intermediate", [(128, 256), (96, 160)], ids=["aligned", "widths-not-x64"])
def test_nf4_merge_equals_the_trained_model_after_eval_forwards_and_a_zo_step(avx512bf16_cpu, dtype, hidden,
                                                                                intermediate, tmp_path):
    import bitsandbytes.functional as bf
    from transformers import LlamaForCausalLM

    model = _nf4_senszo(dtype, hidden, intermediate)
    layers = [m for m in model.modules() if isinstance(m, DenseAndSparseLinear)]
    original = [(m.dense.weight.data.clone(), copy.deepcopy(m.dense.weight.quant_state)) for m in layers]
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    model.eval()
    with torch.inference_mode():  # what every ZO step and every eval does
        model(input_ids=ids)
        spsa_step(model.subtune_state.method.zo_tensors(model, model.subtune_state), lambda: fp32_lm_loss(model, batch), [3], 1e-3, 1e-2)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    for m, (data, state) in zip(layers, original):
        assert torch.equal(dequantized_weight(m.dense, torch.float32), bf.dequantize_4bit(data, state))
        assert dequantized_weight(m.dense).dtype == dtype  # the dtype the layer computes in
    subtune.merge(model)
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    tol = 1e-5 if dtype == torch.float32 else 2**-5 * float(trained.abs().max())
    assert float((merged.float() - trained.float()).abs().max()) <= tol
    subtune.unmerge(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, trained)
    subtune.unload(model)  # the merged export: a plain HF model
    model.save_pretrained(tmp_path / "merged", safe_serialization=True)
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=dtype).state_dict()
    assert exported.keys() == model.state_dict().keys()  # (logits: a bf16 make_tiny keeps bf16 rotary buffers)
    assert all(torch.equal(exported[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, merged)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantized_weight_reads_a_weight_bitsandbytes_repacked_for_its_cpu_kernel(avx512bf16_cpu, dtype):
    """A Linear4bit that did take bitsandbytes' CPU layout (outside subtune): the same codes with the bf16 block
    scales that layout keeps -- exactly what its kernel multiplies -- and the layer itself left as it was."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(256, 128, bias=False, quant_type="nf4", compute_dtype=dtype, device="cpu")
    layer.weight = bnb.nn.Params4bit(torch.randn(128, 256), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu").eval()
    data, state = layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state)
    x = torch.randn(5, 256, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
    assert layer.weight.quant_state.packing_format_for_cpu  # bitsandbytes repacked it
    packed = layer.weight.data.clone()
    scales = (bf.dequantize_blockwise(state.absmax, state.state2) + state.offset).to(torch.bfloat16).float()
    expected = bf.dequantize_4bit(data, bf.QuantState(absmax=scales, shape=state.shape, code=state.code,
                                                      blocksize=state.blocksize, quant_type="nf4",
                                                      dtype=torch.float32))
    got = dequantized_weight(layer, torch.float32)
    assert torch.equal(got, expected)
    torch.testing.assert_close(got, bf.dequantize_4bit(data, state), rtol=2**-8, atol=0)  # bf16 scales only
    assert dequantized_weight(layer).dtype == dtype
    assert torch.equal(layer.weight.data, packed) and layer.weight.quant_state.packing_format_for_cpu  # untouched
    reference = x.to(torch.bfloat16) @ got.to(torch.bfloat16).t()  # the kernel's bf16 matmul
    torch.testing.assert_close(y.float(), reference.float(), rtol=2**-6, atol=2**-6 * float(reference.abs().max()))


def test_a_sparse_layer_whose_4bit_part_was_repacked_still_merges_to_what_it_computes(avx512bf16_cpu):
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 128)
    layer = DenseAndSparseLinear(base, torch.randperm(256 * 128)[:300], quantize="nf4").eval()
    layer.dense.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on such a CPU
    x = torch.randn(6, 256)
    with torch.no_grad():
        y = layer(x)
        assert layer.dense.weight.quant_state.packing_format_for_cpu
        layer.merge()
        merged = layer(x)
    # the repacked layer computes in bf16: agreement within bf16 rounding (today: off by the whole output)
    torch.testing.assert_close(merged, y, rtol=2**-6, atol=2**-6 * float(y.abs().max()))


def test_4bit_layers_keep_the_standard_layout_so_state_dict_leaves_them_unchanged(avx512bf16_cpu):
    model = _nf4_senszo(torch.float32, 128, 256)
    layer = next(m for m in model.modules() if isinstance(m, DenseAndSparseLinear))
    codes = layer.dense.weight.data.clone()
    model.eval()
    with torch.inference_mode():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert not getattr(layer.dense.weight.quant_state, "packing_format_for_cpu", False)
    model.state_dict()  # bitsandbytes would un-repack (and re-quantise the scales) in place here
    assert torch.equal(layer.dense.weight.data, codes)


def test_nf4_works_on_widths_the_cpu_repack_cannot_take(avx512bf16_cpu):
    """bitsandbytes' CPU repack needs in_features % 64 == 0 and out_features % 32 == 0 (issue 10: a crash deep in
    bitsandbytes on the first eval forward); the standard layout takes any width, odd ones included."""
    torch.manual_seed(0)
    for out_f, in_f in [(33, 128), (64, 99), (48, 96)]:
        w = torch.randn(out_f, in_f)
        layer = quantize_nf4(w, None, torch.float32).eval()
        x = torch.randn(3, in_f)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ dequantized_weight(layer).t(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ mask files

def test_a_saved_mask_loads_onto_the_same_model_and_trains_exactly_its_positions(tmp_path):
    from subtune.core.surgery import find_targets
    from subtune.methods.senszo import save_mask
    from subtune.methods.senszo.mask import compute_mask

    config = subtune.SensZOConfig(density=0.02, mask_source="magnitude", quantize="none")
    model = make_tiny(0)
    targets = find_targets(model, config.target_modules)
    mask = compute_mask(model, targets, config, None)
    save_mask(mask, tmp_path / "mask.safetensors", {n: tuple(m.weight.shape) for n, m in targets.items()})
    reused = subtune.prepare(make_tiny(0), subtune.SensZOConfig(mask_path=str(tmp_path / "mask.safetensors"),
                                                                quantize="none"))
    selection = reused.subtune_state.selection.tensors
    assert set(selection) == {f"{n}.index" for n in mask}
    assert all(torch.equal(selection[f"{n}.index"], idx) for n, idx in mask.items())
    assert subtune.trainable_summary(reused).trainable == sum(i.numel() for i in mask.values())


# ------------------------------------------------------------------------------------ dense cache (issue 15, speed)

@pytest.mark.parametrize("quantize", ["nf4", "none"])
def test_the_dense_cache_computes_the_merged_model_exactly_and_follows_the_values(quantize):
    """With the cache on, a no-grad forward is the merged layer's computation bit for bit (dequant(D) + S in one
    matmul), also after the sparse values change; with it off, the layer is as before."""
    torch.manual_seed(0)
    base = torch.nn.Linear(128, 64)
    layer = DenseAndSparseLinear(base, torch.randperm(128 * 64)[:40], quantize=quantize)
    x = torch.randn(5, 128)
    with torch.no_grad():
        plain = layer(x)
        held = layer.cache_dense(True)
        assert held == 64 * 128 * 4  # one fp32 copy of the weight
        cached = layer(x)
        torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
        layer.values.add_(torch.randn(40))  # what a ZO probe does
        cached = layer(x)
        layer.merge()
        assert torch.equal(cached, layer(x))  # the merged model's computation, bit for bit
        layer.unmerge()
        assert layer.cache_dense(False) == 0 and layer._dense_cache is None
        torch.testing.assert_close(layer(x), cached, atol=1e-5, rtol=1e-5)
    x.requires_grad_(True)
    layer.cache_dense(True)
    layer(x).sum().backward()  # a grad-mode forward takes the uncached path: gradients reach the values
    assert layer.values.grad is not None and x.grad is not None
