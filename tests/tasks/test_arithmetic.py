"""The built-in generator: deterministic, disjoint splits, correct gold solutions."""

import re

import pytest

from selfimprove.errors import UserError
from selfimprove.tasks import build_task
from selfimprove.tasks.arithmetic import Arithmetic

EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def make(task_config, **fields):
    return build_task(task_config(**{"generated_train": 300, "generated_test": 100, **fields}))


def test_same_config_gives_identical_rows(task_config):
    assert make(task_config).load("train") == make(task_config).load("train")


def test_different_seed_gives_different_rows(task_config):
    first = {r["question"] for r in make(task_config, seed=0).load("test")}
    second = {r["question"] for r in make(task_config, seed=1).load("test")}
    assert first != second


def test_counts_are_respected_and_questions_distinct(task_config):
    task = make(task_config)
    train, test = task.load("train"), task.load("test")
    assert (len(train), len(test)) == (300, 100)
    assert len({r["question"] for r in train}) == 300
    assert [r["id"] for r in test[:2]] == ["arithmetic-test-00000", "arithmetic-test-00001"]


def test_train_and_test_are_disjoint(task_config):
    # A small range makes collisions likely if splits leaked (and holds fewer distinct problems).
    task = make(task_config, max_value=5, generated_train=150, generated_test=50)
    train, test = task.load("train"), task.load("test")
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert not {r["key"] for r in train} & {r["key"] for r in test}


def test_test_split_does_not_depend_on_train_size(task_config):
    assert make(task_config, generated_train=50).load("test") == make(task_config).load("test")


def test_every_gold_solution_verifies_and_a_wrong_answer_does_not(task_config):
    task = make(task_config, operations="+-*", step_weights=[1, 1, 1, 1])
    for row in task.load("train") + task.load("test"):
        assert row["solution"].endswith(f"The answer is {row['answer']}.")
        assert task.verify(row["solution"], row["answer"])
        assert not task.verify(f"The answer is {int(row['answer']) + 1}.", row["answer"])


def test_two_step_weights_give_two_equations(task_config):
    for row in make(task_config, step_weights=[0, 1]).load("test"):
        assert len(EQUATION.findall(row["solution"])) == 2, row["solution"]


def test_equations_are_right_and_intermediates_non_negative(task_config):
    task = make(task_config, operations="+-*", step_weights=[0, 0, 0, 1], min_value=0, max_value=9)
    for row in task.load("train"):
        for a, op, b, result in EQUATION.findall(row["solution"]):
            a, b, result = int(a), int(b), int(result)
            assert result == {"+": a + b, "-": a - b, "*": a * b}[op]
            assert min(a, b, result) >= 0
            if op in "+-":
                assert 0 <= b <= 9


def test_operations_knob_limits_operations(task_config):
    solutions = " ".join(r["solution"] for r in make(task_config, operations="-").load("test"))
    assert " - " in solutions and " + " not in solutions and " * " not in solutions


def test_variety_one_uses_one_phrasing_per_operation(task_config):
    questions = " ".join(r["question"] for r in make(task_config, variety=1).load("train"))
    assert " buys " in questions and " finds " not in questions and " wins " not in questions


def test_example_is_not_a_generated_problem(task_config):
    task = make(task_config)
    assert Arithmetic.example[0] not in {r["question"] for r in task.load("train") + task.load("test")}


def test_prompt_is_one_shot_as_a_chat_turn(task_config):
    task = make(task_config)
    row = task.load("test")[0]
    example, solution, question = task.prompt(row)
    assert [m["role"] for m in (example, solution, question)] == ["user", "assistant", "user"]
    assert example["content"] == f"{Arithmetic.instruction}\n\nQuestion: {Arithmetic.example[0]}"
    assert solution["content"] == Arithmetic.example[1]
    assert question["content"] == f"Question: {row['question']}"
    assert task.stop == ("\nQuestion:",)


def test_train_size_takes_a_seeded_subset_keeping_ids(task_config):
    full = make(task_config).load("train")
    subset = make(task_config, train_size=10).load("train")
    assert len(subset) == 10 and all(row in full for row in subset)
    assert subset == make(task_config, train_size=10).load("train")


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"max_value": 1, "operations": "-", "step_weights": [1], "variety": 1, "generated_test": 400}, "could only generate"),
        ({"min_value": 9, "max_value": 3}, "task.min_value (9) must not exceed task.max_value (3)"),
        ({"variety": 9}, "task.variety must be at most 5"),
    ],
)
def test_impossible_settings_raise_user_error(task_config, fields, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        make(task_config, **fields).load("test")


def test_unknown_split_raises_user_error(task_config):
    with pytest.raises(UserError, match="not 'validation'"):
        make(task_config).load("validation")
