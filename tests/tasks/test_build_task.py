"""The task registry."""

import pytest

from selfimprove.errors import UserError
from selfimprove.tasks import build_task


@pytest.mark.parametrize("name", ["arithmetic", "arc", "gsm8k", "math"])
def test_builds_each_known_task(task_config, name):
    task = build_task(task_config(name=name))
    assert task.name == name and task.stop and task.instruction


def test_unknown_task_name(task_config):
    with pytest.raises(UserError, match=r"^unknown task 'x' \(known: arithmetic, arc, gsm8k, math, functions, mbpp, humaneval\)$"):
        build_task(task_config(name="x"))


def test_a_task_without_a_val_split_carves_one_from_train_that_train_never_holds(write_jsonl, task_config):
    """Of the questions q0..q39, those whose SHA-256 (of the lower-cased, space-normalised text) has a first byte
    divisible by 8 are val's; the rest stay train's, and a repeat with other spacing lands on the same side."""
    import hashlib

    questions = [f"q{i}" for i in range(40)]
    path = write_jsonl("train.jsonl", [{"question": q, "answer": "#### 1"} for q in questions])
    task = build_task(task_config(name="gsm8k", data=str(path)))
    val = [q for q in questions if hashlib.sha256(q.encode()).digest()[0] % 8 == 0]
    assert [r["question"] for r in task.load("val")] == val and val
    assert [r["question"] for r in task.load("train")] == [q for q in questions if q not in val]
    assert task.load("val")[0]["id"] == "gsm8k-val-00000"
    spaced = write_jsonl("other.jsonl", [{"question": f"  {q.upper()} ", "answer": "#### 1"} for q in questions])
    assert len(build_task(task_config(name="gsm8k", data=str(spaced))).load("val")) == len(val)
