"""Candidate ranking for multiple-choice records: each candidate answer scored by its mean answer log-likelihood.

One scorer serves training and evaluation: the choice objective of the zeroth-order methods (MeZO, Malladi et al.,
arXiv 2305.17333, §3: cross-entropy over these scores) and the candidate-ranking accuracy `subtune eval` reports
next to generation accuracy (the pick is the candidate with the highest score).
"""

from __future__ import annotations

import torch

from subtune.core.errors import DataError


def candidate_scores(model, batch: dict) -> torch.Tensor:
    """Mean log-probability (fp32) of each sequence's labelled tokens: one score per candidate of a ChoiceCollator
    batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits.float()
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    mask = (labels != -100).float()
    return (logp * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def grouped(scores: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """The flat candidate scores split back into one tensor per question."""
    return list(torch.split(scores, counts))


def has_choices(record: dict) -> bool:
    """A record candidate ranking can score: a `choices` list that contains its `answer`."""
    choices = record.get("choices")
    return isinstance(choices, list) and len(choices) >= 2 and record.get("answer") in choices


@torch.no_grad()
def ranking_groups(model, tokenizer, records: list[dict], batch_size: int = 8, max_length: int = 256
                   ) -> list[torch.Tensor]:
    """Each record's candidate scores, one fp32 tensor per record (eval mode; the mode is restored)."""
    from subtune.data.loaders import ChoiceCollator, encode_choice_record

    bad = next((i for i, r in enumerate(records) if not has_choices(r)), None)
    if bad is not None:
        raise DataError(f"candidate ranking needs records with 'choices' holding their 'answer'; record {bad} has "
                        "none: evaluate it by generation only, or add its choices")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = ChoiceCollator(tokenizer.pad_token_id)
    groups: list[torch.Tensor] = []
    for start in range(0, len(records), batch_size):
        batch = collate([encode_choice_record(tokenizer, r, max_length) for r in records[start:start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        groups += [g.cpu() for g in grouped(candidate_scores(model, batch), batch["choice_counts"].tolist())]
    model.train(was_training)
    return groups


def ranking_picks(model, tokenizer, records: list[dict], batch_size: int = 8, max_length: int = 256) -> list[int]:
    """The index of the highest-scoring choice for each record."""
    return [int(g.argmax()) for g in ranking_groups(model, tokenizer, records, batch_size, max_length)]


def ranking_accuracy(model, tokenizer, records: list[dict], batch_size: int = 8) -> float:
    """Share of records whose gold answer scores highest among its choices."""
    picks = ranking_picks(model, tokenizer, records, batch_size)
    return sum(r["choices"][p] == r["answer"] for r, p in zip(records, picks)) / len(records)


def ranking_metrics(model, tokenizer, records: list[dict], batch_size: int = 8) -> tuple[float, float]:
    """(candidate-ranking accuracy, choice loss) in one pass: the loss is the choice objective on these records,
    the mean cross-entropy of the gold candidate over each record's scores (what a ZO run trains)."""
    groups = ranking_groups(model, tokenizer, records, batch_size)
    gold = [r["choices"].index(r["answer"]) for r in records]
    accuracy = sum(int(g.argmax()) == i for g, i in zip(groups, gold)) / len(records)
    loss = sum(float(-torch.log_softmax(g, 0)[i]) for g, i in zip(groups, gold)) / len(records)
    return accuracy, loss
