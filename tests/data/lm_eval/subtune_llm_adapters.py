"""lm-eval hooks for LLM-Adapters records (instruction, input, output, answer, choices), asked the way subtune
trains: subtune's own Alpaca prompt, and each candidate scored as the whole response with the answer swapped in
(as `subtune.data.loaders.encode_choice_record` builds it), so lm-eval ranks exactly what subtune ranks."""

from subtune.data.prompts import build_prompt


def doc_to_text(doc: dict) -> str:
    return build_prompt(doc["instruction"], doc.get("input") or "")


def doc_to_choice(doc: dict) -> list[str]:
    answer, output = doc["answer"], doc["output"]
    return [output.replace(answer, c) if answer in output else c for c in doc["choices"]]


def doc_to_target(doc: dict) -> int:
    return doc["choices"].index(doc["answer"])
