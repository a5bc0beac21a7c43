"""Answer extraction, following the rules of LLM-Adapters' evaluation scripts (Hu et al., EMNLP 2023, arXiv
2304.01933: `commonsense_evaluate.py` takes the first match of the task's answer words, `evaluate.py` the last number).
"""

from __future__ import annotations

import re

LABEL_RE = re.compile(r"^(true|false|answer[1-5]|option[12]|solution[12]|ending[1-4])$")
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def is_numeric(answer: str) -> bool:
    try:
        float(answer.replace(",", ""))
        return True
    except ValueError:
        return False


def extract(response: str, record: dict) -> str:
    """The predicted answer in `response` for this record ('' when none is found)."""
    answer = record["answer"].strip()
    text = response.strip()
    if is_numeric(answer):  # last number in the response
        numbers = NUMBER_RE.findall(text.replace(",", ""))
        return numbers[-1] if numbers else ""
    if LABEL_RE.match(answer.lower()):  # first match of the task's label vocabulary
        kind = re.sub(r"\d+$", "", answer.lower())
        vocab = r"true|false" if kind in ("true", "false") else rf"{kind}\d"
        match = re.search(vocab, text.lower())
        return match.group(0) if match else ""
    choices = record.get("choices")
    if choices:  # earliest-mentioned choice
        lowered = text.lower()
        found = [(lowered.find(c.lower()), c) for c in choices if c.lower() in lowered]
        return min(found)[1] if found else ""
    return text


def is_correct(prediction: str, record: dict) -> bool:
    answer = record["answer"].strip()
    if is_numeric(answer):
        try:
            return abs(float(prediction) - float(answer.replace(",", ""))) <= 1e-3
        except ValueError:
            return False
    return prediction.strip().lower() == answer.lower()
