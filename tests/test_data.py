import json

import pytest

from conftest import CharTokenizer

from subtune.core.errors import DataError
from subtune.data.loaders import CausalCollator, encode_record, load_records
from subtune.data.prompts import build_prompt
from subtune.eval.extract import extract, is_correct


def test_malformed_record_is_reported_with_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c"}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json, line 3: field\(s\) \['output'\]"):
        load_records(path)


def test_invalid_jsonl_line_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: invalid JSON"):
        load_records(path)


def test_empty_dataset_is_refused(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(DataError, match="no records"):
        load_records(path)


def test_missing_answer_is_refused_for_evaluation(tmp_path):
    path = tmp_path / "noanswer.jsonl"
    path.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    assert load_records(path)[0]["output"] == "b"
    with pytest.raises(DataError, match="answer"):
        load_records(path, need_answer=True)


def test_unknown_data_name_lists_embedded_tasks():
    with pytest.raises(DataError, match="arithmetic"):
        load_records("no-such-task")


def test_prompt_tokens_are_masked_and_padding_is_ignored():
    tok = CharTokenizer()
    rec = {"instruction": "add", "input": "", "output": "42"}
    enc = encode_record(tok, rec)
    n_prompt = 1 + len(build_prompt("add"))
    assert enc["labels"][:n_prompt] == [-100] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:] and enc["input_ids"][-1] == 2
    batch = CausalCollator(pad_token_id=0)([enc, encode_record(tok, {"instruction": "x", "output": "1"})])
    assert batch["input_ids"].shape[1] % 8 == 0
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


@pytest.mark.parametrize("response, record, expected, correct", [
    ("3 + 4 = 7. The answer is 7", {"answer": "7"}, "7", True),
    ("1,200 then 12.5", {"answer": "12.5"}, "12.5", True),
    ("no number here", {"answer": "3"}, "", False),
    ("I think answer3, not answer1", {"answer": "answer3"}, "answer3", True),
    ("the correct answer is false", {"answer": "true"}, "false", False),
    ("the correct answer is Ostra or Brask", {"answer": "Ostra", "choices": ["Brask", "Ostra"]}, "Ostra", True),
])
def test_answer_extraction_follows_llm_adapters_rules(response, record, expected, correct):
    assert extract(response, record) == expected
    assert is_correct(extract(response, record), record) is correct
