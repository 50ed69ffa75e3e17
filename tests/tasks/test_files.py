"""read_rows: local files and folders in every format, and one-line errors naming the place."""

import re

import datasets
import huggingface_hub.constants
import pytest

from selfimprove.errors import UserError
from selfimprove.tasks.files import read_rows

ROWS = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
REQUIRED = ("question", "answer")


def keep(row):
    return {"question": row["question"], "answer": row["answer"]}


def test_reads_a_jsonl_file(write_jsonl):
    assert read_rows(str(write_jsonl("d.jsonl", ROWS)), "test", REQUIRED, keep) == ROWS


def test_reads_a_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"question": "q1", "answer": "a1"},\n {"question": "q2", "answer": "a2"}]')
    assert read_rows(str(path), "test", REQUIRED, keep) == ROWS


def test_reads_a_parquet_file(write_parquet):
    assert read_rows(str(write_parquet("d.parquet", ROWS)), "train", REQUIRED, keep) == ROWS


def test_reads_the_split_of_a_folder(write_jsonl, tmp_path):
    write_jsonl("data/train.jsonl", ROWS[:1])
    write_jsonl("data/test.jsonl", ROWS[1:])
    assert read_rows(str(tmp_path / "data"), "test", REQUIRED, keep) == ROWS[1:]


def test_reads_parquet_shards_in_order(write_parquet, tmp_path):
    write_parquet("hf/train-00001-of-00002.parquet", ROWS[1:])
    write_parquet("hf/train-00000-of-00002.parquet", ROWS[:1])
    assert read_rows(str(tmp_path / "hf"), "train", REQUIRED, keep) == ROWS


def test_skips_blank_lines_and_alternative_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"problem": "p", "solution": "s"}\n\n')
    assert read_rows(str(path), "test", (("question", "problem"),), dict) == [{"problem": "p", "solution": "s"}]


def error(source, split="test", required=REQUIRED, convert=keep):
    with pytest.raises(UserError) as raised:
        read_rows(str(source), split, required, convert)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    assert error(tmp_path / "nope.jsonl") == f"dataset path not found: {tmp_path / 'nope.jsonl'}"


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": oops}\n')
    assert re.fullmatch(rf"{re.escape(str(path))}:2: not valid JSON \(.+\)", error(path))


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"question": "q"},\n{oops}\n]')
    assert error(path).startswith(f"{path}:3: not valid JSON")


@pytest.mark.parametrize("missing", ["question", "answer"])
def test_row_without_a_required_field(write_jsonl, missing):
    rows = [ROWS[0], {k: v for k, v in ROWS[1].items() if k != missing}]
    path = write_jsonl("d.jsonl", rows)
    assert error(path) == f"{path}:2: row has no '{missing}'"


def test_row_without_any_alternative(write_jsonl):
    path = write_jsonl("d.jsonl", [{"text": "x"}])
    assert error(path, required=(("problem", "question"),)) == f"{path}:1: row has no 'problem' or 'question'"


def test_convert_errors_name_the_row(write_parquet):
    def refuse(row):
        raise ValueError("no final answer")

    path = write_parquet("d.parquet", ROWS)
    assert error(path, convert=refuse) == f"{path}:1: no final answer"


def test_non_object_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("[1, 2]\n")
    assert error(path) == f"{path}:1: expected a JSON object, got list"


def test_empty_dataset_names_source_and_split(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert error(path, split="train") == f"{path}: split 'train' has no rows"


def test_folder_without_the_split(write_jsonl, tmp_path):
    write_jsonl("data/train.jsonl", ROWS)
    assert error(tmp_path / "data").startswith(f"{tmp_path / 'data'}: no test.jsonl")


def test_unsupported_suffix_and_broken_parquet(tmp_path):
    (tmp_path / "d.csv").write_text("question,answer\n")
    assert "unsupported file type" in error(tmp_path / "d.csv")
    (tmp_path / "d.parquet").write_text("not parquet")
    assert "not a readable Parquet file" in error(tmp_path / "d.parquet")


def test_unreachable_hub_dataset_says_to_pass_a_local_path(monkeypatch):
    # Offline mode makes the hub fail at once instead of after ~25 s of retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    message = error("no-such-org/no-such-dataset")
    assert message.startswith("could not load 'no-such-org/no-such-dataset' (split 'test') from the Hugging Face hub")
    assert message.endswith("pass a local JSONL/Parquet file or folder as task.data")
