"""Zeroth-order runs that learn what a user measures (issue 15): the choice objective by default on multiple-choice
records, candidate-ranking accuracy against a direct computation, best-dev selection restoring the best values, and
a short SensZOQ run on the embedded commonsense task lowering its choice loss."""

import json

import pytest
import torch
from conftest import CharTokenizer, make_tiny

import subtune
from subtune.core.config import ConfigError
from subtune.data.loaders import ChoiceCollator, encode_choice_record, encode_record, load_records
from subtune.eval.choice import ranking_accuracy, ranking_metrics, ranking_picks
from subtune.eval.evaluate import evaluate, report
from subtune.ops.sparse import DenseAndSparseLinear
from subtune.ops.zo import replay
from subtune.train.zo import batch_objective, choice_loss, dev_split, resolve_objective

NAMES = ["Brask", "Ostra", "Umber", "Tesk", "Ivory", "Quill"]


def mc_records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        choices = [NAMES[(i + k) % len(NAMES)] for k in range(3)]
        answer = choices[i % 3]
        out.append({"instruction": f"where {i % 7}", "input": "", "output": f"in {answer}", "answer": answer,
                    "choices": choices})
    return out


class DecodingTokenizer(CharTokenizer):
    """CharTokenizer with the decode `evaluate`'s generation needs (the responses are not what is tested here)."""

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["" for _ in ids]


def test_auto_objective_is_choice_on_multiple_choice_records_and_lm_otherwise():
    mc, plain = mc_records(4), [{"instruction": "add", "output": "3", "answer": "3"}]
    for config in (subtune.SensZOConfig(), subtune.MeZOConfig()):
        assert config.objective == "auto"
        assert resolve_objective(config, mc).objective == "choice"
        assert resolve_objective(config, plain).objective == "lm"
        assert resolve_objective(config, mc[:2] + plain).objective == "lm"  # not every record has choices
    explicit = subtune.SensZOConfig(objective="lm")
    assert resolve_objective(explicit, mc) is explicit
    lora = subtune.LoraConfig()
    assert resolve_objective(lora, mc) is lora  # gradient methods have no ZO objective to resolve
    state = subtune.prepare(make_tiny(0), subtune.MeZOConfig()).subtune_state
    assert batch_objective(state, {"choice_counts": torch.tensor([3])}) == "choice"
    assert batch_objective(state, {"input_ids": torch.zeros(1, 2)}) == "lm"


def test_dev_split_holds_out_the_last_records_for_choice_runs_only():
    records = mc_records(10)
    config = subtune.SensZOConfig(objective="choice", dev_size=3)
    train, dev = dev_split(config, records)
    assert train == records[:7] and dev == records[7:]
    assert dev_split(subtune.SensZOConfig(objective="lm", dev_size=3), records) == (records, [])
    assert dev_split(subtune.SensZOConfig(objective="choice", dev_size=0), records) == (records, [])
    with pytest.raises(ConfigError, match="dev_size 6 .* lower dev_size"):
        dev_split(subtune.SensZOConfig(objective="choice", dev_size=6), records)
    with pytest.raises(ConfigError, match="dev_size must be a whole number"):
        subtune.SensZOConfig(dev_size=-1).validate()


def _direct_scores(model, tok, record) -> list[float]:
    """Reference: each candidate alone (the output with its answer swapped for the candidate), its mean
    log-probability over the answer tokens, one position at a time, in float64."""
    scores = []
    for choice in record["choices"]:
        enc = encode_record(tok, {**record, "output": record["output"].replace(record["answer"], choice)})
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([enc["input_ids"]])).logits[0].double(), -1)
        terms = [float(logp[t - 1, enc["input_ids"][t]]) for t in range(1, len(enc["labels"]))
                 if enc["labels"][t] != -100]
        scores.append(sum(terms) / len(terms))
    return scores


def test_ranking_accuracy_equals_a_direct_computation_and_eval_reports_it():
    model, tok = make_tiny(3), CharTokenizer(keep_last=12)
    records = mc_records(9)
    scores = [_direct_scores(model, tok, r) for r in records]
    expected = [max(range(3), key=s.__getitem__) for s in scores]
    assert min(sorted(s)[-1] - sorted(s)[-2] for s in scores) > 1e-4  # no near-tie: the pick is well defined
    assert ranking_picks(model, tok, records, batch_size=4) == expected  # padded batches pick the same
    accuracy = sum(r["choices"][p] == r["answer"] for r, p in zip(records, expected)) / len(records)
    assert ranking_accuracy(model, tok, records) == accuracy
    mixed = records + [{"instruction": "add", "output": "3", "answer": "3"}]  # generation-only record
    result = evaluate(model, DecodingTokenizer(keep_last=12), mixed, max_new_tokens=2, with_perplexity=False,
                      progress=False)
    assert (result.ranking_total, result.ranking_accuracy) == (9, accuracy)
    summary = report(result)
    assert summary["ranking_accuracy"] == round(accuracy, 4) and summary["ranking_total"] == 9
    assert "ranked" in result.predictions[0] and "ranked" not in result.predictions[-1]


def test_choice_loss_is_cross_entropy_of_the_ranking_scores():
    model, tok = make_tiny(1), CharTokenizer(keep_last=12)
    records = mc_records(3)
    batch = ChoiceCollator(0)([encode_choice_record(tok, r) for r in records])
    from subtune.eval.choice import candidate_scores, grouped

    with torch.no_grad():
        groups = grouped(candidate_scores(model, batch), batch["choice_counts"].tolist())
        expected = sum(-torch.log_softmax(g, 0)[int(gold)] for g, gold in zip(groups, batch["gold"])) / 3
        assert torch.allclose(choice_loss(model, batch), expected, atol=1e-6)
    # the dev loss best-dev selection reads is this same objective
    assert ranking_metrics(model, tok, records)[1] == pytest.approx(float(expected), abs=1e-6)


def test_a_zo_run_restores_its_best_dev_values_and_records_the_choice_objective(tmp_path):
    """finetune on multiple-choice records: the saved config says choice, dev is evaluated every step, and the
    final values are the replay of the history up to the best dev step (earliest on ties)."""
    from subtune.recipes import finetune

    tok = CharTokenizer(keep_last=12)
    records = mc_records(24)
    model = make_tiny(0)
    config = subtune.SensZOConfig(density=0.05, quantize="none", mask_source="magnitude", eps=1e-2, dev_size=8,
                                  eval_every=1)
    _, trainer = finetune(model, tok, config, records, tmp_path / "run", max_steps=6, learning_rate=0.5,
                          batch_size=4, warmup=0, lr_scheduler="constant", save_steps=2, progress=False)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["config"]["objective"] == "choice"
    best = trainer.best_dev
    assert [p["step"] for p in best.curve] == list(range(7))
    losses = [p["dev_choice_loss"] for p in best.curve]
    assert best.best is best.curve[losses.index(min(losses))]  # the lowest dev loss, the earliest on ties
    dev = records[-8:]
    accuracy, loss = ranking_metrics(model, tok, dev)  # the restored values are the best ones
    assert accuracy == best.best["dev_ranking_accuracy"] and loss == pytest.approx(best.best["dev_choice_loss"],
                                                                                    abs=1e-6)
    fresh = subtune.prepare(make_tiny(0), config)
    state = fresh.subtune_state
    values = [v.detach().clone() for v in state.method.zo_tensors(fresh, state)]
    history = json.loads((tmp_path / "run" / "checkpoint-6" / "zo_history.json").read_text())
    replay(values, history[:best.best["step"]], lambda step: history[step]["lr"])
    for a, b in zip(values, state.method.zo_tensors(model, model.subtune_state)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_a_short_senszo_run_on_commonsense_lowers_its_choice_loss():
    """The embedded model, two commonsense questions, 8 SPSA steps on them (magnitude mask, the 4-bit base with its
    dense cache): the choice loss on those questions falls."""
    from subtune.train.zo import step_seed, zo_step
    from subtune.zoo import load_model

    model, tok = load_model("default")
    records = load_records("commonsense", "train")[:2]
    batch = ChoiceCollator(tok.pad_token_id)([encode_choice_record(tok, r) for r in records])
    subtune.prepare(model, subtune.SensZOConfig(mask_source="magnitude", objective="choice"))
    for layer in model.modules():
        if isinstance(layer, DenseAndSparseLinear):
            layer.cache_dense(True)
    model.eval()
    with torch.inference_mode():
        before = float(choice_loss(model, batch))
    for step in range(8):
        zo_step(model, model.subtune_state, batch, 5e-2, [step_seed(0, step, 0)])
    with torch.inference_mode():
        after = float(choice_loss(model, batch))
    assert after < before, (before, after)
