"""The one calibration pass (core/calibration.py) and the one batch builder (data/calibration.py).

Selections must not change: each method's selection through the shared pass is compared, bit for bit, with the
same method run through a frozen copy of the loop it had before (S²FT gradient and activation scores, SMT warm-up in
both modes, SensZOQ sensitivity). The pass must leave the model as it found it, even when a batch raises.
"""

import copy

import pytest
import torch
from conftest import CharTokenizer, make_tiny
from reliability import Case, cases_param, check_case
from torch import nn

import subtune
from subtune.core.calibration import (CalibrationError, accumulate_activation_statistic,
                                      accumulate_gradient_statistic)
from subtune.core.errors import DataError
from subtune.data.calibration import calibration_for
from subtune.data.loaders import calibration_batches
from subtune.methods.s2ft import select as s2ft_select
from subtune.methods.senszo import mask as senszo_mask
from subtune.methods.smt import select as smt_select
from subtune.ops.sliced import INPUT_COLUMNS
from subtune.zoo import corpus_calibration


# ---- frozen copies of the three loops as they were before the shared pass (do not "fix" these) ------------------

def old_s2ft_passes(model, calibration, limit, backward):
    device = next(model.parameters()).device
    for i, batch in enumerate(calibration):
        if i >= limit:
            break
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if backward:
            model(**batch).loss.backward()
        else:
            with torch.no_grad():
                model(**{k: v for k, v in batch.items() if k != "labels"})


def old_s2ft_activation_scores(model, comps, calibration, limit):
    layers = s2ft_select.decoder_layers(model)
    sums = {name: torch.zeros(len(layers), c.units * c.unit_size) for name, c in comps.items()}
    handles = []
    for name, comp in comps.items():
        for li, layer in enumerate(layers):
            def hook(module, inputs, output, name=name, li=li, comp=comp):
                act = inputs[0] if comp.kind == INPUT_COLUMNS else output
                sums[name][li] += act.detach().float().pow(2).reshape(-1, act.shape[-1]).sum(0).cpu()
            handles.append(layer.get_submodule(comp.module).register_forward_hook(hook))
    try:
        old_s2ft_passes(model, calibration, limit, backward=False)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.stack([s2ft_select._unit_norms(row, comps[name].unit_size) for row in s])
            for name, s in sums.items()}


def old_s2ft_gradient_scores(model, comps, calibration, limit):
    layers = s2ft_select.decoder_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    sums = {name: torch.zeros(len(layers), c.units * c.unit_size) for name, c in comps.items()}
    weights, handles = [], []
    for name, comp in comps.items():
        for li, layer in enumerate(layers):
            w = layer.get_submodule(comp.module).weight
            w.requires_grad_(True)
            weights.append(w)

            def hook(param, name=name, li=li, comp=comp):
                g = param.grad.detach().float()
                sums[name][li] += ((g * g).sum(0) if comp.kind == INPUT_COLUMNS else (g * g).sum(1)).cpu()
                param.grad = None
            handles.append(w.register_post_accumulate_grad_hook(hook))
    try:
        old_s2ft_passes(model, calibration, limit, backward=True)
    finally:
        for h in handles:
            h.remove()
        for w in weights:
            w.requires_grad_(False)
            w.grad = None
    return {name: torch.stack([s2ft_select._unit_norms(row, comps[name].unit_size) for row in s])
            for name, s in sums.items()}


def old_smt_warmup_gradients(model, candidates, calibration, config, progress=False):
    sums = {name: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device)
            for name, m in candidates.items()}
    device = next(model.parameters()).device
    if config.warmup_updates:
        for p in model.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.warmup_lr, betas=(0.9, 0.95), weight_decay=0.0)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in candidates.values():
            m.weight.requires_grad_(True)
    handles = []
    for name, m in candidates.items():
        def fold(param, name=name):
            sums[name] += param.grad.float()
            if not config.warmup_updates:
                param.grad = None
        handles.append(m.weight.register_post_accumulate_grad_hook(fold))
    was_training = model.training
    model.eval()
    steps = 0
    try:
        for batch in calibration:
            if steps >= config.warmup_steps:
                break
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            model(**batch).loss.backward()
            if config.warmup_updates:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            steps += 1
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(False)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return sums


def old_senszo_sensitivity(model, targets, calibration, samples, progress=False):
    scores = {n: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device) for n, m in targets.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = []
    for name, m in targets.items():
        m.weight.requires_grad_(True)

        def fold(param, name=name):
            scores[name] += param.grad.float().pow(2)
            param.grad = None
        handles.append(m.weight.register_post_accumulate_grad_hook(fold))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for sample in senszo_mask.per_sample(calibration, samples):
            sample = {k: v.to(device) for k, v in sample.items()}
            if "labels" not in sample:
                sample["labels"] = sample["input_ids"]
            model(**sample).loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(False)
        model.train(was_training)
    return scores


# ---- data -------------------------------------------------------------------------------------------------------

def batches(n, seed=0, rows=2, length=9, pad=False, labels=True):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 64, (rows, length), generator=gen)
        mask = torch.ones_like(ids)
        if pad:  # right padding of different lengths, as the collator writes it
            for r in range(rows):
                mask[r, length - 1 - 2 * r:] = 0
            ids = ids.masked_fill(mask == 0, 0)
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels:
            batch["labels"] = ids.masked_fill(mask == 0, -100)
        out.append(batch)
    return out


def selection(model):
    return {k: v.clone() for k, v in model.subtune_state.selection.tensors.items()}


def assert_same_selection(new, old):
    assert list(new) == list(old)
    for key in new:
        assert torch.equal(new[key], old[key]), key


def prepare_both(monkeypatch, module, name, old, make_model, config, calib):
    """(selection through the shared pass, selection with the old loop plugged back in), same model and data."""
    new_model = subtune.prepare(make_model(), copy.deepcopy(config), calibration=calib)
    with monkeypatch.context() as m:
        m.setattr(module, name, old)
        old_model = subtune.prepare(make_model(), copy.deepcopy(config), calibration=calib)
    return new_model, old_model


# ---- the selections are the ones the old loops made ---------------------------------------------------------------

S2FT_CASES = {
    "gradient-global": dict(strategy="gradient", o_ratio=0.25, v_ratio=0.5, d_ratio=0.1, u_ratio=0.1),
    "gradient-uniform-small": dict(strategy="gradient", o_ratio=0.25, d_ratio=0.1, allocation="uniform",
                                   direction="small"),
}


@pytest.mark.parametrize("case", list(S2FT_CASES))
def test_s2ft_gradient_selection_is_the_old_loops(monkeypatch, case):
    config = subtune.S2FTConfig(target_modules=["o_proj", "v_proj", "down_proj", "up_proj"], calibration_batches=3,
                                seed=5, **S2FT_CASES[case])
    new, old = prepare_both(monkeypatch, s2ft_select, "gradient_scores", old_s2ft_gradient_scores,
                            lambda: make_tiny(1, kv_heads=4), config, batches(4, pad=True))
    assert_same_selection(selection(new), selection(old))


@pytest.mark.parametrize("strategy", ["activation", "weight_activation"])
def test_s2ft_activation_selection_is_the_old_loops(monkeypatch, strategy):
    config = subtune.S2FTConfig(target_modules=["o_proj", "v_proj", "down_proj", "up_proj"], o_ratio=0.25,
                                v_ratio=0.5, d_ratio=0.1, u_ratio=0.1, strategy=strategy, calibration_batches=2)
    new, old = prepare_both(monkeypatch, s2ft_select, "activation_scores", old_s2ft_activation_scores,
                            lambda: make_tiny(2, kv_heads=4), config, batches(3, pad=True))
    assert_same_selection(selection(new), selection(old))


def test_s2ft_scores_equal_the_old_loops_bit_for_bit():
    model = make_tiny(3, kv_heads=4)
    comps = s2ft_select.components(model)
    calib = batches(3, seed=1, pad=True)
    for new, old in ((s2ft_select.gradient_scores, old_s2ft_gradient_scores),
                     (s2ft_select.activation_scores, old_s2ft_activation_scores)):
        got, want = new(model, comps, calib, 2), old(model, comps, calib, 2)
        assert list(got) == list(want)
        assert all(torch.equal(got[n], want[n]) for n in want), new.__name__


@pytest.mark.parametrize("updates", [False, True])
def test_smt_selection_and_warmed_base_are_the_old_loops(monkeypatch, updates):
    config = subtune.SMTConfig(block_size=8, num_blocks=6, mlp_num_blocks=4, warmup_steps=3, warmup_updates=updates,
                               warmup_lr=1e-2)
    new, old = prepare_both(monkeypatch, smt_select, "warmup_gradients", old_smt_warmup_gradients,
                            lambda: make_tiny(4, intermediate=44), config, batches(5, seed=2, pad=True))
    assert_same_selection(selection(new), selection(old))
    new_state, old_state = new.state_dict(), old.state_dict()
    assert list(new_state) == list(old_state)
    assert all(torch.equal(new_state[k], old_state[k]) for k in old_state)  # the warmed base too, bit for bit


@pytest.mark.parametrize("scope", ["per_matrix", "global"])
def test_senszo_selection_is_the_old_loops(monkeypatch, scope):
    config = subtune.SensZOConfig(density=0.02, scope=scope, quantize="none", calibration_samples=5,
                                  target_modules=["q_proj", "v_proj", "down_proj"])
    new, old = prepare_both(monkeypatch, senszo_mask, "sensitivity", old_senszo_sensitivity, lambda: make_tiny(5),
                            config, batches(3, seed=3, rows=2, pad=True))
    assert_same_selection(selection(new), selection(old))


def test_senszo_scores_equal_the_old_loop_bit_for_bit():
    model = make_tiny(6)
    targets = {n: m for n, m in model.named_modules() if n.endswith(("k_proj", "up_proj"))}
    calib = batches(2, seed=4, rows=3, pad=True, labels=False)
    got = senszo_mask.sensitivity(model, targets, calib, 5, progress=False)
    want = old_senszo_sensitivity(model, targets, calib, 5)
    assert list(got) == list(targets) and all(torch.equal(got[n], want[n]) for n in targets)


# ---- one mode: eval -------------------------------------------------------------------------------------------

def with_dropout(model, p=0.5):
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = p
    return model


def test_the_pass_runs_in_eval_mode_so_dropout_cannot_change_a_selection():
    """The one selection the unified mode changes: S²FT on a model with dropout > 0 left in train mode (the old S²FT
    loop ran in the caller's mode and drew dropout masks; SMT and SensZOQ already ran in eval)."""
    model = with_dropout(make_tiny(7, kv_heads=4)).train()
    comps = s2ft_select.components(model)
    calib = batches(2, seed=5)
    first = s2ft_select.gradient_scores(model, comps, calib, 2)
    second = s2ft_select.gradient_scores(model, comps, calib, 2)
    assert all(m.training for m in model.modules())  # the caller's train mode is back
    model.eval()
    reference = old_s2ft_gradient_scores(model, comps, calib, 2)  # the old loop, without dropout
    model.train()
    torch.manual_seed(0)
    in_train_mode = old_s2ft_gradient_scores(model, comps, calib, 2)
    for name in comps:
        assert torch.equal(first[name], second[name]) and torch.equal(first[name], reference[name])
    assert any(not torch.equal(in_train_mode[n], reference[n]) for n in comps)  # dropout really was active


# ---- the model comes back as it was ------------------------------------------------------------------------------

def _mixed_state(model):
    """Some parameters trainable, some submodules in eval, some gradients present: what a caller may hand in."""
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 3 == 0)
    model.train()
    model.model.layers[0].eval()
    scored = model.model.layers[0].self_attn.q_proj.weight  # a weight the pass scores: its old grad must not leak in
    scored.grad = torch.full_like(scored, 7.0)
    return ([p.requires_grad for p in params], [m.training for m in model.modules()], scored.grad)


def _grads_as_before(model, grad):
    scored = model.model.layers[0].self_attn.q_proj.weight
    return scored.grad is grad and all(p.grad is None for p in model.parameters() if p is not scored)


def _targets(model):
    return {n: m.weight for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}


def test_flags_modes_and_gradients_are_restored_and_a_callers_gradient_neither_leaks_nor_is_lost():
    model, fresh = make_tiny(8), make_tiny(8)
    flags, modes, grad = _mixed_state(model)
    calib = batches(2, seed=6)
    got = accumulate_gradient_statistic(model, _targets(model), calib, "sum", progress=False)
    want = accumulate_gradient_statistic(fresh, _targets(fresh), calib, "sum", progress=False)
    assert got.batches == 2 and list(got.statistics) == list(_targets(model))
    assert all(torch.equal(got.statistics[n], want.statistics[n]) for n in want.statistics)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert _grads_as_before(model, grad)


def test_a_batch_that_raises_midway_leaves_the_model_as_it_was():
    model = make_tiny(9)
    flags, modes, grad = _mixed_state(model)

    def failing():
        yield from batches(1, seed=7)
        yield {"input_ids": torch.full((1, 4), 10**6)}  # an id outside the vocabulary: the forward raises

    with pytest.raises(IndexError):
        accumulate_gradient_statistic(model, _targets(model), failing(), "sum_sq", progress=False)
    calls = []

    def fails_midway_through_a_backward(key, grad):
        calls.append(key)
        if len(calls) == 3:
            raise RuntimeError("statistic failed")
        return grad.float()
    with pytest.raises(RuntimeError, match="statistic failed"):
        accumulate_gradient_statistic(model, _targets(model), batches(2), fails_midway_through_a_backward,
                                      progress=False)
    with pytest.raises(IndexError):
        accumulate_activation_statistic(model, {"q": model.model.layers[0].self_attn.q_proj}, failing(),
                                        lambda key, inputs, output: output.sum(), progress=False)
    params = list(model.parameters())
    assert [p.requires_grad for p in params] == flags and [m.training for m in model.modules()] == modes
    assert _grads_as_before(model, grad)
    assert not any(m._forward_hooks for m in model.modules())
    weight = model.model.layers[0].self_attn.q_proj.weight  # no fold hook left behind: a backward keeps its grad
    weight.requires_grad_(True)
    model(**batches(1)[0]).loss.backward()
    assert weight.grad is not None


def test_sum_and_squares_equal_plain_backward_loops_and_no_more_than_limit_batches_are_read():
    model = make_tiny(10)
    calib = batches(4, seed=8, rows=1)
    read = []

    def counted():
        for b in calib:
            read.append(1)
            yield b
    got_sum = accumulate_gradient_statistic(model, _targets(model), counted(), "sum", limit=3, progress=False)
    assert len(read) == 3 and got_sum.batches == 3
    got_sq = accumulate_gradient_statistic(model, _targets(model), calib, "sum_sq", limit=3, progress=False)
    reference = make_tiny(10).eval()
    names = list(_targets(reference))
    sums = {n: torch.zeros_like(w) for n, w in _targets(reference).items()}
    squares = {n: torch.zeros_like(w) for n, w in _targets(reference).items()}
    for b in calib[:3]:
        reference.zero_grad()
        reference(**b).loss.backward()
        for n in names:
            g = reference.get_submodule(n).weight.grad
            sums[n] += g
            squares[n] += g * g
    for n in names:
        torch.testing.assert_close(got_sum.statistics[n], sums[n], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got_sq.statistics[n], squares[n], rtol=1e-6, atol=1e-12)


def test_a_batch_without_labels_is_scored_on_its_own_tokens_without_the_padding():
    model = make_tiny(11)
    with_labels, without = batches(2, seed=9, pad=True), batches(2, seed=9, pad=True, labels=False)
    got = accumulate_gradient_statistic(model, _targets(model), without, "sum", progress=False)
    want = accumulate_gradient_statistic(model, _targets(model), with_labels, "sum", progress=False)
    assert all(torch.equal(got.statistics[n], want.statistics[n]) for n in want.statistics)
    # S²FT's gradient strategy used to fail on such batches ('NoneType' has no 'backward'); now it selects
    config = subtune.S2FTConfig(strategy="gradient", d_ratio=0.1, calibration_batches=2)
    assert_same_selection(selection(subtune.prepare(make_tiny(11), config, calibration=without)),
                          selection(subtune.prepare(make_tiny(11), config, calibration=with_labels)))


def test_a_step_sees_every_gradient_and_the_statistic_is_taken_before_it():
    model, reference = make_tiny(12), make_tiny(12)
    calib = batches(2, seed=10)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    seen_grads = []

    def step():
        seen_grads.append(all(p.grad is not None for p in params))
        optimizer.step()
    got = accumulate_gradient_statistic(model, _targets(model), calib, "sum", step=step, step_params=params,
                                        progress=False)
    assert seen_grads == [True, True]
    reference.eval()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    sums = {n: torch.zeros_like(w) for n, w in _targets(reference).items()}
    for b in calib:
        reference(**b).loss.backward()
        for n in sums:
            sums[n] += reference.get_submodule(n).weight.grad
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    for n in sums:
        assert torch.equal(got.statistics[n], sums[n])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert all(p.grad is None for p in model.parameters())


# ---- the batch builder --------------------------------------------------------------------------------------------

RECORDS = [{"instruction": f"add {i} and {i + 1}", "output": str(2 * i + 1)} for i in range(5)]


def _equal_batches(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_builder_gives_what_each_caller_built_before():
    tok = CharTokenizer()
    # recipes.finetune: S²FT/SMT read the first training batches of the training batch size
    smt = subtune.SMTConfig(warmup_steps=3)
    assert _equal_batches(calibration_for(smt, tok, RECORDS, batch_size=4),
                          calibration_batches(tok, RECORDS, batch_size=4, num_batches=3))
    # SensZOQ's default: the embedded corpus (recipes and `senszo-mask` without --data)
    senszo = subtune.SensZOConfig(calibration_samples=3)
    assert _equal_batches(calibration_for(senszo, tok, RECORDS, seq=16), corpus_calibration(tok, samples=3, seq=16))
    # `senszo-mask --data`: one record per batch
    from_data = subtune.SensZOConfig(calibration_samples=3, calibration_source="train")
    assert _equal_batches(calibration_for(from_data, tok, RECORDS, batch_size=1),
                          calibration_batches(tok, RECORDS, batch_size=1, num_batches=3))
    # the benchmark: one synthetic batch repeated, no tokenizer
    batch = batches(1)[0]
    assert calibration_for(subtune.S2FTConfig(strategy="gradient", calibration_batches=2), batch=batch) == [batch] * 2
    # methods (or settings) that read no data get None, whatever is passed
    for config in (subtune.S2FTConfig(), subtune.LoraConfig(), subtune.SensZOConfig(mask_source="magnitude")):
        assert calibration_for(config, tok, RECORDS) is None


# ---- the bad-input catalogue ------------------------------------------------------------------------------------

class _Unreached(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = make_tiny(0)
        self.extra = nn.Linear(4, 4)  # not on the loss path

    def forward(self, **batch):
        return self.model(**batch)


def _unreached(also_reached):
    def run(tmp):
        wrapper = _Unreached()
        params = {"extra": wrapper.extra.weight}
        if also_reached:
            params["q"] = wrapper.model.model.layers[0].self_attn.q_proj.weight
        accumulate_gradient_statistic(wrapper, params, batches(1), progress=False)
    return run


CASES = [
    Case("s2ft-gradient-empty-calibration",
         lambda tmp: subtune.prepare(make_tiny(0), subtune.S2FTConfig(strategy="gradient"), calibration=[]),
         DataError, ("gave no batch", "strategy 'gradient'", "'random' or 'weight'"),
         tries="S²FT `strategy='gradient'` with `calibration=[]`",
         before="silent: channels chosen from no data (re-checked on 6e1ed7a)"),
    Case("s2ft-activation-empty-calibration",
         lambda tmp: subtune.prepare(make_tiny(0), subtune.S2FTConfig(strategy="activation"), calibration=iter([])),
         DataError, ("gave no batch", "strategy 'activation'"),
         tries="S²FT `strategy='activation'` with an empty calibration iterator",
         before="silent: channels chosen from no data (re-checked on 6e1ed7a)"),
    Case("calibration-weight-without-gradient", _unreached(True), CalibrationError,
         ("no gradient reached 'extra'", "loss depends on"),
         tries="a gradient statistic over a weight the loss does not reach", before="new"),
    Case("calibration-no-weight-on-the-loss-path", _unreached(False), CalibrationError,
         ("depends on none of the 1 weights", "target modules the model's loss depends on"),
         tries="a gradient statistic over no weight the loss depends on", before="new"),
    Case("calibration-for-without-tokenizer", lambda tmp: calibration_for(subtune.SMTConfig(), None, RECORDS),
         DataError, ("needs the tokenizer", "tokenizer="), tries="`calibration_for` without a tokenizer", before="new"),
    Case("calibration-for-train-without-records",
         lambda tmp: calibration_for(subtune.SMTConfig(), CharTokenizer(), None), DataError,
         ("needs the training records", "records="),
         tries="`calibration_for` from the training data without records", before="new"),
]


@cases_param(CASES)
def test_catalogue_calibration(case, tmp_path):
    check_case(case, tmp_path)


def test_an_empty_s2ft_calibration_changes_nothing():
    model, fresh = make_tiny(0), make_tiny(0)
    with pytest.raises(DataError):
        subtune.prepare(model, subtune.S2FTConfig(strategy="gradient"), calibration=[])
    assert not hasattr(model, "subtune_state")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
