"""Code tasks: programs found in completions, the generated task's problems, MBPP and HumanEval rows, and
verification by the problem's tests in the real sandbox."""

import gzip
import json
from dataclasses import replace

import pytest

from selfimprove.config import SandboxConfig, TaskConfig
from selfimprove.errors import UserError
from selfimprove.evaluate import aggregate, pass_at_k, problem_results
from selfimprove.sandbox import Verdict
from selfimprove.tasks import build_task
from selfimprove.tasks.base import Judgement
from selfimprove.tasks.code import NO_PROGRAM, extract_program, judgement
from selfimprove.tasks.functions import HIDDEN_TESTS, make_problem


@pytest.mark.parametrize("text, program", [
    ("Here it is:\n```python\ndef f(x):\n    return x\n```\nDone.", "def f(x):\n    return x"),
    ("```\ndef f(x):\n    return x\n```", "def f(x):\n    return x"),
    ("```py\nimport math\n```\n```python\ndef g(): pass\n```", "import math"),  # the first block with code
    ("```text\nnot code\n```\n```python\ndef g(): pass\n```", "def g(): pass"),  # another language is skipped
    ("```python\ndef f(x):\n    return x", "def f(x):\n    return x"),  # cut off before the closing fence
    ("def f(x):\n    return x + 1\nThis function adds one.", "def f(x):\n    return x + 1"),  # bare, then prose
    ("Sure.\nfrom math import sqrt\ndef r(x):\n    return sqrt(x)", "from math import sqrt\ndef r(x):\n    return sqrt(x)"),
    ("The answer is 5.", None),
    ("def f(x:\n", None),  # bare code that never parses
])
def test_the_program_is_the_first_code_block_or_the_bare_code_that_parses(text, program):
    assert extract_program(text) == program


def test_generated_problems_name_the_function_show_one_call_and_hide_tests_the_reference_passes():
    import random

    rng = random.Random(3)
    for _ in range(50):
        key, _, build = make_problem(rng)
        problem = build()
        name = problem["entry_point"]
        assert problem["question"].startswith(f"Write a function `{name}(")
        assert f"For example, {name}(" in problem["question"]
        assert len(problem["tests"]) == HIDDEN_TESTS and all(t.startswith(f"assert {name}(") for t in problem["tests"])
        scope = {}
        exec(problem["answer"], scope)
        for test in problem["tests"]:
            exec(test, scope)


def test_generated_splits_never_share_a_function_and_are_stable():
    task = build_task(TaskConfig(name="functions", generated_train=300, generated_test=100))
    train, test = task.load("train"), task.load("test")
    assert len(train) == 300 and len(test) == 100
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert task.load("test") == test
    with pytest.raises(UserError, match="functions has the splits train, val, test"):
        task.load("validation")


def test_a_program_is_judged_by_its_tests_in_the_sandbox():
    task = build_task(TaskConfig(name="functions", generated_test=5))
    problem = task.load("test")[0]
    name = problem["entry_point"]
    assert said(task.judge(problem["solution"], problem)) == (True, f"passed: all {HIDDEN_TESTS} tests passed")
    wrong = f"```python\ndef {name}(*args):\n    return None\n```"
    correct, verdict = said(task.judge(wrong, problem))
    assert not correct and verdict.startswith("failed: test 1: assert ")
    assert task.judge("I cannot write code.", problem) == Judgement(False, NO_PROGRAM)
    exits = f"```python\nimport sys\ndef {name}(*args):\n    sys.exit(0)\n```"
    assert said(task.judge(exits, problem)) == (False, f"crashed: exited (0) in test 1: {problem['tests'][0]}")
    assert task.judge(exits, problem).flags == ("exit",)
    assert not task.check(wrong, problem) and task.check(problem["solution"], problem)


def said(judged: Judgement) -> tuple[bool, str | None]:
    """A judgement's verdict: how the tests were decided (`judged`) is the sandbox's to test."""
    return judged.correct, judged.verdict


def test_a_flagged_pass_fails_only_when_flagged_passes_are_set_to_fail():
    """A program that passes while reading a frame: counted (it passes, flagged) by default, failed with
    task.sandbox.flagged=fail, its verdict naming the flag and what the sandbox said."""
    program = "```python\nimport sys\n\ndef double(x):\n    return 2 * sys._getframe(0).f_locals['x']\n```"
    problem = {"id": "p", "question": "", "answer": "", "tests": ["assert double(2) == 4", "assert double(5) == 10"],
               "setup": "", "entry_point": "double", "stub": ""}
    counted = build_task(TaskConfig(name="functions")).judge(program, problem)
    assert (counted.correct, counted.verdict, counted.flags) == (True, "passed: all 2 tests passed", ("frame",))
    failed = build_task(TaskConfig(name="functions", sandbox=SandboxConfig(flagged="fail"))).judge(program, problem)
    assert (failed.correct, failed.verdict, failed.flags) == (False, "flagged (frame): passed: all 2 tests passed",
                                                              ("frame",))
    assert failed.judged == counted.judged


@pytest.mark.parametrize("verdict, flags, flagged, expected", [
    (Verdict("passed", "all 3 tests passed", judged="value"), ["exit", "gc"], "fail",
     Judgement(False, "flagged (exit, gc): passed: all 3 tests passed", "value", ("exit", "gc"))),
    (Verdict("passed", "all 3 tests passed", judged="value"), ["exit", "gc"], "count",
     Judgement(True, "passed: all 3 tests passed", "value", ("exit", "gc"))),
    (Verdict("passed", "all 3 tests passed"), [], "fail", Judgement(True, "passed: all 3 tests passed", "in_process")),
    (Verdict("failed", "test 2: assert f(1) == 2"), ["frame"], "fail",  # a failure stays as the sandbox said it
     Judgement(False, "failed: test 2: assert f(1) == 2", "in_process", ("frame",))),
])
def test_a_verdict_becomes_a_judgement_that_fails_flagged_passes_only_when_asked(verdict, flags, flagged, expected):
    assert judgement(verdict, flags, flagged) == expected


def mbpp_row(**over):
    return {"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\r\n    return a + b",
            "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"],
            "test_setup_code": "", **over}


def test_mbpp_rows_show_the_first_test_and_run_all_of_them(tmp_path):
    data = tmp_path / "mbpp.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in (
        mbpp_row(), mbpp_row(text="Write a function that returns the limit.", code="def get():\n    return LIMIT",
                             test_list=["assert get() == 3"], test_setup_code="LIMIT = 3"))) + "\n")
    task = build_task(TaskConfig(name="mbpp", data=str(data)))
    first, second = task.load("test")
    assert first["question"] == "Write a function to add two numbers. Your code should pass this test: assert add(1, 2) == 3"
    assert (first["entry_point"], first["answer"]) == ("add", "def add(a, b):\n    return a + b")
    assert said(task.judge(first["solution"], first)) == (True, "passed: all 3 tests passed")
    assert said(task.judge("```python\ndef add(a, b):\n    return a - b\n```", first)) == (
        False, "failed: test 1: assert add(1, 2) == 3")
    assert task.check(second["solution"], second)  # its set-up code ran first


def test_bad_mbpp_rows_fail_in_one_line_naming_the_line(tmp_path):
    data = tmp_path / "mbpp.jsonl"
    data.write_text(json.dumps(mbpp_row()) + "\n" + json.dumps(mbpp_row(test_list=[])) + "\n")
    with pytest.raises(UserError, match=r"mbpp.jsonl:2: 'test_list' must be a non-empty list"):
        build_task(TaskConfig(name="mbpp", data=str(data))).load("test")
    data.write_text(json.dumps(mbpp_row(test_list="assert add(1, 2) == 3")) + "\n")
    with pytest.raises(UserError, match=r"mbpp.jsonl:1: .*'test_list' must be a non-empty list"):
        build_task(TaskConfig(name="mbpp", data=str(data))).load("test")


def test_humaneval_comes_with_its_package_and_a_body_alone_continues_the_prompt(tmp_path):
    task = build_task(TaskConfig(name="humaneval"))
    problems = task.load("test")
    assert len(problems) == 164
    first = problems[0]
    # The official order: the prompt, the program, the test code, the check call; the test code runs apart from
    # the program, with the prompt's imports and helpers but not its entry point.
    assert first["tests"][1] == "check(has_close_elements)" and first["setup"] == ""
    assert first["tests"][0].startswith("from typing import List\n") and "def check(candidate)" in first["tests"][0]
    assert "def has_close_elements" not in first["tests"][0]
    body = first["answer"][len(first["stub"]):]
    assert said(task.judge(f"```python\n{body}\n```", first)) == (True, "passed: all 2 tests passed")
    assert not task.check("```python\ndef has_close_elements(numbers, threshold):\n    return True\n```", first)
    # A completion that brings its own `check` does not replace the test's.
    forged = "```python\ndef has_close_elements(numbers, threshold):\n    return True\ndef check(candidate):\n    pass\n```"
    assert said(task.judge(forged, first)) == (False, "failed: test 2: check(has_close_elements)")
    with pytest.raises(UserError, match="humaneval has a test split only"):
        task.load("train")
    data = tmp_path / "he.jsonl.gz"
    with gzip.open(data, "wt") as f:
        f.write(json.dumps({"task_id": "x/0", "prompt": "def one():\n", "canonical_solution": "    return 1\n",
                            "test": "def check(c):\n    assert c() == 1\n", "entry_point": "one"}) + "\n{\n")
    with pytest.raises(UserError, match=r"he.jsonl.gz:2: not a HumanEval row"):
        build_task(replace(TaskConfig(name="humaneval"), data=str(data))).load("test")


def test_every_canonical_humaneval_solution_passes_by_value():
    task = build_task(TaskConfig(name="humaneval"))
    judged = [task.judge(p["solution"], p) for p in task.load("test")]
    assert [j.verdict for j in judged if not j.correct] == []
    assert len(judged) == 164 and {j.judged for j in judged} == {"value"}


def test_pass_at_k_is_the_unbiased_estimator_and_programs_get_no_majority_vote():
    # n=4, c=1: pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6; c=0: 0; n - c < k: 1.
    assert (pass_at_k(4, 1, 2), pass_at_k(4, 0, 2), pass_at_k(4, 3, 2), pass_at_k(4, 1, 1)) == (0.5, 0.0, 1.0, 0.25)

    def sample(pid, kind, i, correct):
        return {"problem_id": pid, "pass": kind, "sample_index": i, "extracted": "def f(): pass", "correct": correct,
                "answer": "def f(): pass"}

    rows = problem_results([sample("p1", "greedy", 0, False), *(sample("p1", "sample", i, i == 2) for i in range(4)),
                            sample("p2", "greedy", 0, True), *(sample("p2", "sample", i, False) for i in range(4))])
    assert aggregate(rows, 4, votes=False) == {"problems": 2, "pass@1": 0.5, "pass@4": 0.5}


def test_step_values_of_a_program_come_from_running_its_completions_tests():
    """SIPF on code: steps are lines; each prefix's completions are whole programs the sandbox tests. The sample
    `def twice(x):` / `y = x + x` / `return y + 1` (wrong): from the first line, completions finish it right 2 of
    4 times; from the second, all go on with its `y` and the scripted completer ends `return y` 1 of 4 times."""
    from selfimprove.config import ProcessConfig
    from selfimprove.reward.mc_prm import score_samples

    task = build_task(TaskConfig(name="functions"))
    problem = {"id": "p", "question": "", "answer": "", "tests": ["assert twice(3) == 6", "assert twice(0) == 0"],
               "setup": "", "entry_point": "twice", "stub": ""}
    text = "def twice(x):\n    y = x + x\n    return y + 1"
    sample = {"problem_id": "p", "sample_index": 0, "prompt_text": "P|", "text": text, "answer": "", "status": "ok",
              "correct": False}
    draws = {}

    def complete(prompts, seeds, temperature):
        out = []
        for prompt in prompts:
            j = draws[prompt] = draws.get(prompt, -1) + 1
            if prompt.endswith("def twice(x):"):
                out.append("\n    return 2 * x" if j % 2 else "\n    return x")
            else:
                out.append("\n    return y" if j == 0 else "\n    return y - 1")
        return out

    rows, _ = score_samples(complete, [sample], task, ProcessConfig(k=4), seed=0, problems={"p": problem})
    assert [r["value"] for r in rows] == [0.5, 0.25, 0.0]


def test_a_code_task_knows_its_isolation_at_load_and_a_machine_without_one_fails_there(monkeypatch):
    from selfimprove import sandbox

    assert build_task(TaskConfig(name="functions")).isolation == "bwrap"
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    sandbox.isolation.cache_clear()
    try:
        with pytest.raises(UserError, match="cannot isolate them"):
            build_task(TaskConfig(name="functions"))
    finally:
        sandbox.isolation.cache_clear()
