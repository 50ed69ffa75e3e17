"""MATH rows in their accepted shapes, and the LaTeX-aware, total verifier."""

import threading
import time

import pytest

from selfimprove.errors import UserError
from selfimprove.tasks import build_task
from selfimprove.tasks.math import to_row

SOLUTION = "We have $x = \\frac{2}{4} = \\boxed{\\frac{1}{2}}$."


@pytest.mark.parametrize(
    "raw, answer, solution",
    [
        ({"problem": "p", "solution": SOLUTION}, "\\frac{1}{2}", SOLUTION),
        ({"problem": "p", "solution": SOLUTION, "answer": "0.5"}, "0.5", SOLUTION),
        ({"question": "p", "answer": SOLUTION}, "\\frac{1}{2}", SOLUTION),
        ({"question": "p", "answer": "7"}, "7", ""),
    ],
)
def test_row_shapes(raw, answer, solution):
    assert to_row(raw) == {"question": "p", "answer": answer, "solution": solution}


def test_loads_parquet(write_parquet, task_config, tmp_path):
    write_parquet("math/train-00000-of-00001.parquet", [{"problem": "p", "solution": SOLUTION, "level": "Level 1"}])
    (row,) = build_task(task_config(name="math", data=tmp_path / "math")).load("train")
    assert row == {"id": "math-train-00000", "question": "p", "answer": "\\frac{1}{2}", "solution": SOLUTION}


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"problem": "p", "solution": "no box"}, ":1: no final answer"),
        ({"solution": SOLUTION}, ":1: row has no 'problem' or 'question'"),
        ({"problem": "p"}, ":1: row has no 'solution' or 'answer'"),
    ],
)
def test_bad_rows(write_jsonl, task_config, raw, fragment):
    path = write_jsonl("test.jsonl", [raw])
    with pytest.raises(UserError, match=fragment):
        build_task(task_config(name="math", data=path)).load("test")


@pytest.mark.parametrize(
    "text, gold, expected",
    [
        ("So $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", True),
        ("So $x = \\boxed{0.5}$.", "\\frac{1}{2}", True),
        ("The answer is 1/2.", "\\frac{1}{2}", True),
        ("\\boxed{3\\sqrt{2}}", "\\sqrt{18}", True),
        ("\\boxed{\\dfrac{7}{2}}", "\\frac72", True),
        ("\\boxed{x^2 + 1}", "1 + x^2", True),
        ("\\boxed{2}", "\\frac{1}{2}", False),
        ("x = 1/2", "\\frac{1}{2}", False),  # stated nowhere
        ("\\boxed{\\frac{1}{", "\\frac{1}{2}", False),
        ("\\boxed{}}}{{", "", False),
    ],
)
def test_verify(task_config, text, gold, expected):
    assert build_task(task_config(name="math")).verify(text, gold) is expected


def test_verify_works_off_the_main_thread(task_config):
    """math_verify's signal-based timeout would raise outside the main thread."""
    task = build_task(task_config(name="math"))
    results = []
    thread = threading.Thread(target=lambda: results.append(task.verify("\\boxed{0.5}", "\\frac{1}{2}")))
    thread.start()
    thread.join()
    assert results == [True]


@pytest.mark.parametrize(
    "answer", ["9^{9^{9^{9}}}", "10^{10^{10}}", "10^{9999999}", "999999!", "(10^{10})!", "10^{10}!", "((10!)!)!"]
)
def test_huge_numbers_are_compared_as_strings_not_computed(task_config, answer):
    """sympy would work these out holding the GIL, beyond any timeout (hours off the main thread)."""
    task = build_task(task_config(name="math"))
    start = time.monotonic()
    assert not task.verify(f"\\boxed{{{answer}}}", "3")
    assert task.verify(f"\\boxed{{{answer}}}", answer)
    assert time.monotonic() - start < 1
