"""Load LLM-Adapters JSON records (a JSON list or JSON lines), validate them, tokenize them and batch them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from subtune.core.config import ConfigError
from subtune.core.errors import DataError
from subtune.data.prompts import build_prompt

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
REQUIRED = ("instruction", "output")


def embedded_tasks() -> list[str]:
    return sorted(p.name for p in TASKS_DIR.iterdir() if (p / "train.json").is_file()) if TASKS_DIR.is_dir() else []


def resolve_data(name_or_path: str, split: str = "train") -> Path:
    """An embedded task name ('arithmetic', 'commonsense') or a path to a .json/.jsonl file."""
    if name_or_path in embedded_tasks():
        path = TASKS_DIR / name_or_path / f"{split}.json"
        if not path.is_file():
            splits = sorted(p.stem for p in (TASKS_DIR / name_or_path).glob("*.json"))
            raise DataError(f"embedded task {name_or_path!r} has no split {split!r}; use one of {splits}")
        return path
    path = Path(name_or_path)
    if path.is_dir():
        raise DataError(f"data {name_or_path!r} is a directory; pass a .json or .jsonl file of records")
    if not path.is_file():
        raise DataError(f"data {name_or_path!r} is neither an embedded task {embedded_tasks()} nor an existing file")
    return path


def read_text(path: Path) -> str:
    """The file as UTF-8 text (a BOM is allowed); an unreadable or non-UTF-8 file raises DataError saying where."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e}); check the path and its permissions") \
            from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}, line {line} (byte {e.start}): not valid UTF-8 ({e.reason}); save the file as UTF-8 "
                        "(e.g. iconv -f latin1 -t utf-8)") from None


def _records_with_lines(text: str) -> list[tuple[int, Any]]:
    """(line number, decoded value) for each element of a JSON list, or each line of JSON lines."""
    stripped = text.lstrip()
    decoder = json.JSONDecoder()
    if stripped.startswith("["):
        out, pos = [], text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                raise DataError("unterminated JSON list")
            if text[pos] == "]":
                return out
            line = text.count("\n", 0, pos) + 1
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"line {e.lineno}: invalid JSON ({e.msg})") from None
            out.append((line, value))
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"line {i}: invalid JSON ({e.msg})") from None
    return out


def load_records(name_or_path: str | Path, split: str = "train", need_answer: bool = False) -> list[dict]:
    """Validated records; a malformed one raises DataError naming the file and line."""
    path = resolve_data(str(name_or_path), split)
    text = read_text(path)
    try:
        items = _records_with_lines(text)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    required = REQUIRED + (("answer",) if need_answer else ())
    for line, rec in items:
        if not isinstance(rec, dict):
            raise DataError(f"{path}, line {line}: expected an object with {list(required)}, got {type(rec).__name__}")
        bad = [k for k in required if not isinstance(rec.get(k), str)]
        if bad:
            raise DataError(f"{path}, line {line}: field(s) {bad} missing or not a string; each record needs "
                            f"{list(required)} (LLM-Adapters format)")
        if "input" in rec and not isinstance(rec["input"], str):
            raise DataError(f"{path}, line {line}: 'input' must be a string")
        choices = rec.get("choices")
        if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
            raise DataError(f"{path}, line {line}: 'choices' must be a list of strings, got {choices!r:.60}")
    if not items:
        raise DataError(f"{path} holds no records; give at least one {{instruction, input, output, answer}} record")
    return [rec for _, rec in items]


def encode_record(tokenizer, record: dict, max_length: int = 256, train_on_inputs: bool = False) -> dict:
    """BOS + prompt + response + EOS; prompt tokens get label -100 unless train_on_inputs."""
    prompt = build_prompt(record["instruction"], record.get("input", ""))
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    response_ids = tokenizer(record["output"], add_special_tokens=False).input_ids
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = (bos + prompt_ids + response_ids + [tokenizer.eos_token_id])[:max_length]
    n_prompt = min(len(bos) + len(prompt_ids), len(ids))
    labels = list(ids) if train_on_inputs else [-100] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids, "labels": labels}


def encode_prompt(tokenizer, record: dict) -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(build_prompt(record["instruction"], record.get("input", "")),
                           add_special_tokens=False).input_ids


class CausalCollator:
    """Right-pads input_ids/labels (labels with -100) and builds the attention mask."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8):
        self.pad_token_id, self.multiple = pad_token_id, pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        longest = -(-longest // self.multiple) * self.multiple
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
            batch["labels"].append(list(f.get("labels", f["input_ids"])) + [-100] * pad)
        return {k: torch.tensor(v) for k, v in batch.items()}


def calibration_batches(tokenizer, records: list[dict], batch_size: int = 8, num_batches: int = 8,
                        max_length: int = 256) -> list[dict[str, torch.Tensor]]:
    """`num_batches` collated batches from the first records (cycling if there are too few), for selection."""
    if not records:
        raise DataError("calibration needs at least one record; pass the training records (or another dataset)")
    for name, value in (("batch_size", batch_size), ("num_batches", num_batches), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"calibration_batches: {name} must be an int >= 1, got {value!r}")
    collate = CausalCollator(tokenizer.pad_token_id)
    encoded = [encode_record(tokenizer, r, max_length) for r in records[: batch_size * num_batches]]
    encoded = [encoded[i % len(encoded)] for i in range(batch_size * num_batches)]
    return [collate(encoded[i:i + batch_size]) for i in range(0, len(encoded), batch_size)]


def encode_choice_record(tokenizer, record: dict, max_length: int = 256) -> dict:
    """One sequence per candidate answer (the output with the answer swapped for the candidate) and the gold index,
    for MeZO-style multiple-choice losses."""
    choices, answer = record.get("choices"), record.get("answer")
    if not choices or answer not in choices:
        raise DataError(f"a choice objective needs records with 'choices' containing 'answer'; got {record!r:.120}")
    outputs = [record["output"].replace(answer, c) if answer in record["output"] else c for c in choices]
    candidates = [encode_record(tokenizer, {**record, "output": out}, max_length) for out in outputs]
    return {"candidates": candidates, "gold": choices.index(answer)}


class ChoiceCollator:
    """Flattens candidates into one padded batch; `choice_counts` and `gold` say how to regroup them."""

    def __init__(self, pad_token_id: int):
        self.inner = CausalCollator(pad_token_id)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.inner([c for f in features for c in f["candidates"]])
        batch["choice_counts"] = torch.tensor([len(f["candidates"]) for f in features])
        batch["gold"] = torch.tensor([f["gold"] for f in features])
        return batch
