"""Generated splits by structure (issue 34): no val or test problem is a training problem in other words, and
the generated functions' hidden tests tell trivial and wrong-constant programs from the right one."""

import random
import re

import pytest

from selfimprove.config import TaskConfig
from selfimprove.errors import UserError
from selfimprove.tasks import build_task
from selfimprove.tasks.functions import FAMILIES, HIDDEN_TESTS
from selfimprove.tasks.splits import split_of

SEEDS = (0, 1, 2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["arithmetic", "functions"])
def test_no_val_or_test_problem_shares_a_structural_key_with_another_split(name, seed):
    task = build_task(TaskConfig(name=name, seed=seed, generated_train=2000, generated_val=200, generated_test=200))
    keys = {split: [p["key"] for p in task.load(split)] for split in ("train", "val", "test")}
    assert {split: len(k) for split, k in keys.items()} == {"train": 2000, "val": 200, "test": 200}
    assert all(len(set(k)) == len(k) and {split_of(key) for key in k} == {split} for split, k in keys.items())
    assert not set(keys["train"]) & set(keys["val"]) and not set(keys["train"]) & set(keys["test"])
    assert not set(keys["val"]) & set(keys["test"])


def test_an_arithmetic_key_is_the_start_then_each_operation_and_operand():
    """'Tom has 7 apples. He buys 3 more apples. Then he loses 2 apples.' is 7, + 3, - 2 whoever and whatever."""
    for row in build_task(TaskConfig(generated_test=50, step_weights=[1, 1])).load("test"):
        numbers = re.findall(r"\d+", row["question"])
        assert row["key"].split()[::2] == numbers[:1] + numbers[1:]
        assert set(row["key"].split()[1::2]) <= set("+-*")


def test_a_function_key_is_its_body_without_names_and_the_example_is_no_hidden_test():
    for row in build_task(TaskConfig(name="functions", generated_test=200)).load("test"):
        name = row["entry_point"]
        assert row["key"].startswith("return ") and name not in row["key"]
        example = re.search(rf"For example, ({re.escape(name)}\(.*\)) == ", row["question"]).group(1)
        assert len(row["tests"]) == HIDDEN_TESTS
        assert not any(test.startswith(f"assert {example} == ") for test in row["tests"])


def passes(program, row) -> bool:
    scope = {row["entry_point"]: program}
    try:
        for test in row["tests"]:
            exec(test, scope)  # our generated tests, against our own stand-in programs
    except Exception:  # noqa: BLE001 -- an assert or the program's error: not passed
        return False
    return True


LITERAL = re.compile(r"'[^']*'|-?\d+")


def shape(body: str) -> str:
    return LITERAL.sub("#", body)


def wrong_constants(row) -> list:
    """Programs a model that half-read the question would write: the row's body (its key) with each literal moved
    by 1 to 3 (another letter, for a letter), and its family's body with constants drawn afresh (ten draws)."""
    key = row["key"]
    bodies = []
    for match in LITERAL.finditer(key):
        literal = match.group()
        moved = ([str(int(literal) + d) for d in (-3, -2, -1, 1, 2, 3)] if literal[0] != "'"
                 else [repr(c) for c in "aeiosnt-,+/ "])
        bodies += [key[:match.start()] + m + key[match.end():] for m in moved]
    rng = random.Random(key)
    (family,) = [f for f in FAMILIES if shape(f.body.format(**f.constants(rng), p="x")) == shape(key)]
    bodies += [family.body.format(**family.constants(rng), p="x") for _ in range(10)]
    programs = []
    for body in set(bodies) - {key}:
        scope = {}
        exec(f"def f(x):\n    {body}\n", scope)  # our own variants of our own reference
        programs.append(scope["f"])
    return programs


TRIVIAL = {"return 0": lambda x: 0, "return False": lambda x: False, "return None": lambda x: None,
           "return []": lambda x: [], "return the argument": lambda x: x}


@pytest.mark.parametrize("seed", SEEDS)
def test_trivial_and_wrong_constant_programs_pass_at_most_one_percent_of_test_problems(seed):
    rows = build_task(TaskConfig(name="functions", seed=seed, generated_test=200)).load("test")
    for what, program in TRIVIAL.items():
        assert sum(passes(program, row) for row in rows) <= len(rows) // 100, what
    wrong = [(row, program) for row in rows for program in wrong_constants(row)]
    assert len(wrong) > 10 * len(rows)
    assert sum(passes(program, row) for row, program in wrong) <= len(wrong) // 100


def test_a_split_that_does_not_exist_is_refused_naming_the_ones_that_do():
    for name in ("arithmetic", "functions"):
        with pytest.raises(UserError, match=f"^{name} has the splits train, val, test, not 'validation'$"):
            build_task(TaskConfig(name=name)).load("validation")


# task.holdout=families: the functions' constants give 294 training functions of the ten kinds left.
FAMILY_SIZES = {"arithmetic": {}, "functions": {"generated_train": 290, "generated_val": 150}}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name, held", [("arithmetic", {"-", "+-"}),
                                        ("functions", {"in_range", "last_letters", "power_minus", "scale_shift"})])
def test_held_out_families_are_all_of_test_and_none_of_train_or_val(name, held, seed):
    """The held families are the quarter (rounded up) of the kinds with the first SHA-256: 2 of arithmetic's 6
    operation sequences at 1-2 steps of + and -, 4 of the 14 function families. Test holds them alone; train and
    val hold the others, split by key as ever, and share no key with each other or with test."""
    task = build_task(TaskConfig(name=name, seed=seed, holdout="families", **FAMILY_SIZES[name]))
    rows = {split: task.load(split) for split in ("train", "val", "test")}
    families = {split: {p["family"] for p in r} for split, r in rows.items()}
    assert families["test"] == held and not families["train"] & held and not families["val"] & held
    assert families["train"] | held == ({"+", "-", "++", "+-", "-+", "--"} if name == "arithmetic"
                                        else {f.names[0] for f in FAMILIES})
    assert all({split_of(p["key"]) for p in rows[split]} == {split} for split in ("train", "val"))
    keys = {split: {p["key"] for p in r} for split, r in rows.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]


def test_holding_out_families_needs_two_kinds_of_problem():
    with pytest.raises(UserError) as e:
        build_task(TaskConfig(operations="+", step_weights=[1], holdout="families")).load("train")
    assert str(e.value) == ("task.holdout=families: arithmetic as configured has 1 kind of problem (+), and holding one "
                            "out needs another to train on")
