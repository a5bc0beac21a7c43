"""Accuracy by greedy generation + answer extraction, candidate-ranking accuracy for multiple-choice records, and
perplexity of the reference responses."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from subtune.core.config import ConfigError
from subtune.core.errors import DataError
from subtune.data.loaders import CausalCollator, encode_prompt, encode_record
from subtune.eval.choice import has_choices, ranking_picks
from subtune.eval.extract import extract, is_correct


@dataclass
class EvalResult:
    accuracy: float
    correct: int
    total: int
    perplexity: float | None = None
    predictions: list[dict] = field(default_factory=list, repr=False)
    # candidate ranking (eval/choice.py) over the records that have `choices`; None when none has
    ranking_accuracy: float | None = None
    ranking_correct: int | None = None
    ranking_total: int | None = None


@torch.no_grad()
def generate_responses(model, tokenizer, records: list[dict], batch_size: int = 32, max_new_tokens: int = 24,
                       progress: bool = True) -> list[str]:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    responses = []
    for start in tqdm(range(0, len(records), batch_size), desc="generate", disable=not progress, leave=False):
        prompts = [encode_prompt(tokenizer, r) for r in records[start:start + batch_size]]
        longest = max(map(len, prompts))
        ids = torch.full((len(prompts), longest), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, so every prompt ends where generation starts
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        responses += tokenizer.batch_decode(out[:, longest:], skip_special_tokens=True)
    model.train(was_training)
    return responses


@torch.no_grad()
def perplexity(model, tokenizer, records: list[dict], batch_size: int = 32) -> float | None:
    """exp(mean token loss) of the reference responses given their prompts (inf on overflow, None if no token)."""
    check_eval_args(records, batch_size, 1)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = CausalCollator(tokenizer.pad_token_id)
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(records), batch_size):
        batch = collate([encode_record(tokenizer, r) for r in records[start:start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                                 reduction="sum")
        total_loss += loss.item()
        total_tokens += int((labels != -100).sum())
    model.train(was_training)
    if total_tokens == 0:
        warnings.warn("perplexity: no reference token is left to score (every answer was cut); reporting none",
                      stacklevel=2)
        return None
    try:
        return math.exp(total_loss / total_tokens)  # nan stays nan
    except OverflowError:
        return float("inf")


def check_eval_args(records: list[dict], batch_size: int, max_new_tokens: int) -> None:
    """Refuse what would report a meaningless number (no records: accuracy 0, perplexity 1) before any work."""
    if not records:
        raise DataError("nothing to evaluate: the record list is empty; pass at least one record (check --limit)")
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"evaluate: {name} must be an int >= 1, got {value!r}")


def report(result: EvalResult, **fields) -> dict:
    """A JSON-safe summary: a non-finite perplexity (a diverged adapter) becomes None, with a warning."""
    ppl = result.perplexity
    if ppl is not None and not math.isfinite(ppl):
        warnings.warn(f"perplexity is {ppl} (the model gives non-finite or overflowing losses); reported as null",
                      stacklevel=2)
        ppl = None
    out = {**fields, "accuracy": round(result.accuracy, 4), "correct": result.correct, "total": result.total,
           "perplexity": None if ppl is None else round(ppl, 4)}
    if result.ranking_accuracy is not None:
        out.update(ranking_accuracy=round(result.ranking_accuracy, 4), ranking_correct=result.ranking_correct,
                   ranking_total=result.ranking_total)
    return out


def evaluate(model, tokenizer, records: list[dict], batch_size: int = 32, max_new_tokens: int = 24,
             with_perplexity: bool = True, progress: bool = True, with_ranking: bool = True) -> EvalResult:
    """Generation accuracy (and perplexity) over `records`; with `with_ranking`, also candidate-ranking accuracy
    over those records that have `choices` (the metric the choice objective optimises)."""
    check_eval_args(records, batch_size, max_new_tokens)
    responses = generate_responses(model, tokenizer, records, batch_size, max_new_tokens, progress)
    predictions = []
    for record, response in zip(records, responses):
        pred = extract(response, record)
        predictions.append({"response": response, "pred": pred, "answer": record["answer"],
                            "flag": is_correct(pred, record)})
    correct = sum(p["flag"] for p in predictions)
    ppl = perplexity(model, tokenizer, records, batch_size) if with_perplexity else None
    result = EvalResult(accuracy=correct / len(records), correct=correct, total=len(records), perplexity=ppl,
                        predictions=predictions)
    ranked = [(i, r) for i, r in enumerate(records) if has_choices(r)] if with_ranking else []
    if ranked:
        picks = ranking_picks(model, tokenizer, [r for _, r in ranked], batch_size)
        for (i, r), pick in zip(ranked, picks):
            predictions[i]["ranked"] = r["choices"][pick]
        result.ranking_correct = sum(predictions[i]["ranked"] == r["answer"] for i, r in ranked)
        result.ranking_total = len(ranked)
        result.ranking_accuracy = result.ranking_correct / len(ranked)
    return result
