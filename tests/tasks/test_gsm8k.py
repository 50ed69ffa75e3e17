"""GSM8K rows from local files, and the verifier against every gold solution of the real data."""

import json
import os
from pathlib import Path

import pytest

from selfimprove.config import TaskConfig
from selfimprove.errors import UserError
from selfimprove.tasks import build_task
from selfimprove.tasks.base import carved
from selfimprove.tasks.gsm8k import to_row

RAW = {
    "question": "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. She sells the rest for $2 each. "
    "How much does she make?",
    "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18",
}
# SELFIMPROVE_SHARED_DATA names the shared data folder (the one holding gsm8k/).
SHARED = Path(os.environ.get("SELFIMPROVE_SHARED_DATA", Path(__file__).parents[2] / "../shared/data")) / "gsm8k"


def test_row_strips_annotations_and_states_the_answer():
    assert to_row(RAW) == {
        "question": RAW["question"],
        "answer": "18",
        "solution": "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day. The answer is 18.",
    }


def test_answer_commas_are_removed():
    assert to_row({"question": "q", "answer": "2 * 1000 = 2000\n#### 2,000"})["answer"] == "2000"


def test_loads_a_folder_with_ids(write_jsonl, task_config, tmp_path):
    write_jsonl("gsm8k/test.jsonl", [RAW, RAW])
    rows = build_task(task_config(name="gsm8k", data=tmp_path / "gsm8k")).load("test")
    assert [r["id"] for r in rows] == ["gsm8k-test-00000", "gsm8k-test-00001"]
    assert rows[0]["answer"] == "18"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She makes 9 * 2 = 18 dollars. The answer is 18.", True),
        ("The answer is $18.00.", True),
        ("#### 18", True),
        ("The answer is 17.", False),
        ("She makes 9 * 2 = 18 dollars.", False),
        ("", False),
    ],
)
def test_verify(task_config, text, expected):
    assert build_task(task_config(name="gsm8k")).verify(text, "18") is expected


@pytest.mark.parametrize(
    "row, fragment",
    [
        ({"answer": "#### 3"}, ":1: row has no 'question'"),
        ({"question": "q", "answer": "just 3"}, ":1: 'answer' has no final '#### N' line"),
    ],
)
def test_bad_rows(write_jsonl, task_config, row, fragment):
    path = write_jsonl("test.jsonl", [row])
    with pytest.raises(UserError, match=fragment):
        build_task(task_config(name="gsm8k", data=path)).load("test")


def test_a_row_without_an_answer_is_a_question_alone(write_jsonl, task_config):
    path = write_jsonl("train.jsonl", [{"question": "q1"}, {"question": "q2", "answer": ""},
                                       {"question": "q4", "answer": "2 + 1 = 3\n#### 3"}])  # q3 would be val's
    rows = build_task(task_config(name="gsm8k", data=path)).load("train")
    assert [(r["answer"], r["solution"]) for r in rows] == [("", ""), ("", ""), ("3", "2 + 1 = 3 The answer is 3.")]


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared GSM8K data not found at {SHARED} (set SELFIMPROVE_SHARED_DATA)")
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_shared_gold_solution_verifies(task_config, split):
    """Both the raw `answer` field and our reformatted solution must score as correct."""
    task = build_task(task_config(name="gsm8k", data=SHARED))
    raw = [json.loads(line) for line in (SHARED / f"{split}.jsonl").read_text().splitlines() if line.strip()]
    raw = [r for r in raw if split == "test" or not carved(r["question"])]  # train less the carved val split
    rows = task.load(split)
    assert len(rows) == len(raw) > 1000
    wrong = [row["id"] for row, r in zip(rows, raw, strict=True)
             if not (task.verify(r["answer"], row["answer"]) and task.verify(row["solution"], row["answer"]))]
    assert wrong == []


def test_answer_key_groups_equal_numbers(task_config):
    task = build_task(task_config(name="gsm8k"))
    assert task.answer_key("The answer is $18.00.") == task.answer_key("#### 18") == "18"
    assert task.answer_key("She makes 18 dollars.") is None


def test_a_file_too_small_to_carve_a_val_split_from_says_so(tmp_path):
    """Val is carved from train by hash (1 in 8): one training question that does not hash into it leaves val empty,
    which is an error naming the way out, not an empty evaluation."""
    question = next(q for q in (f"What is {n} + 1?" for n in range(100)) if not carved(q))
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": question, "answer": "#### 2"}) + "\n")
    task = build_task(TaskConfig(name="gsm8k", data=str(tmp_path)))
    assert [p["question"] for p in task.load("train")] == [question]
    with pytest.raises(UserError) as e:
        task.load("val")
    assert str(e.value) == ("task gsm8k: no val problems: val is 1 in 8 of the training questions (by hash), and "
                            "these give none; use more, or eval.split=test")
