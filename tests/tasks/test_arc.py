"""ARC rows as lettered options, choice extraction, and the verifier."""

import pytest

from selfimprove.errors import UserError
from selfimprove.tasks import build_task
from selfimprove.tasks.arc import extract_choice, to_row

RAW = {
    "id": "Mercury_1",
    "question": "Which gas do plants take in?",
    "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
    "answerKey": "B",
}


def test_row_lists_lettered_options():
    assert to_row(RAW) == {
        "question": "Which gas do plants take in?\nA. oxygen\nB. carbon dioxide\nC. helium\nD. neon",
        "answer": "B",
        "solution": "",
    }


def test_numeric_labels_become_letters():
    raw = {**RAW, "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "3"}
    assert to_row(raw)["answer"] == "C"


def test_loads_jsonl_and_prompts_with_options(write_jsonl, task_config):
    task = build_task(task_config(name="arc", data=write_jsonl("arc.jsonl", [RAW])))
    (row,) = task.load("validation")
    assert row["id"] == "arc-validation-00000"
    assert task.prompt(row)[-1]["content"].endswith("B. carbon dioxide\nC. helium\nD. neon")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Plants use carbon dioxide. The answer is B.", "B"),
        ("The answer is (C) helium.", "C"),
        ("Answer: D", "D"),
        ("\\boxed{A}", "A"),
        ("\\boxed{\\text{B}}", "B"),
        ("I think (A) is wrong, so (B).", "B"),
        ("The answer is Apples.", None),
        ("The answer is carbon dioxide.", None),
        ("no choice here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


@pytest.mark.parametrize(
    "text, gold, expected",
    [("The answer is B.", "B", True), ("The answer is b.", "B", False), ("The answer is C.", "B", False), ("", "B", False)],
)
def test_verify(task_config, text, gold, expected):
    assert build_task(task_config(name="arc")).verify(text, gold) is expected


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"answerKey": "E"}, ":1: answerKey 'E' is not one of the labels A, B, C, D"),
        ({"choices": {"text": ["x"], "label": ["A", "B"]}}, ":1: 'choices' must hold lists"),
        ({"choices": "A or B"}, ":1: 'choices' must hold lists"),
        ({"question": None}, ":1: row has no 'question'"),
        ({"answerKey": ""}, ":1: row has no 'answerKey'"),
    ],
)
def test_bad_rows(write_jsonl, task_config, changes, fragment):
    path = write_jsonl("arc.jsonl", [{**RAW, **changes}])
    with pytest.raises(UserError, match=fragment):
        build_task(task_config(name="arc", data=path)).load("test")


def test_answer_key_is_the_letter(task_config):
    task = build_task(task_config(name="arc"))
    assert task.answer_key("Oxygen is wrong. The answer is (B).") == "B"
    assert task.answer_key("no idea") is None
