"""Code tasks: the answer is a program, and it is correct when the problem's hidden tests pass in the sandbox.

A code problem row has, besides id / question / answer (the reference program) / solution (that program
in a fenced block, the form the prompt's example answers in):
  tests        the test statements (usually asserts), run one by one after the program and `setup`, in
               the sandbox's test process: they reach the program only by calling the names it defines
  setup        code run after the program, in its process, and before the tests, in theirs (MBPP's
               `test_setup_code`), "" if none
  entry_point  the function the tests call, "" if not known
  stub         code run before the program, which a program continues when it does not define
               `entry_point` itself (HumanEval's prompt: a model may answer with the body alone), "" if none

The program is the first fenced block of the completion that holds code, else the completion itself
from its first `def`/`import`/`class` line, cut back to what parses. Verification runs one program at a
time on a core of its own (`verify_cpus`), as many at once as `task.sandbox.workers`. The reward-hacking monitor's
flags on the program (`selfimprove/monitor.py`) go with its verdict; with `task.sandbox.flagged=fail` a flagged pass
fails.
"""

from __future__ import annotations

import ast
import re

from selfimprove import monitor
from selfimprove.sandbox import Verdict, isolation, run_tests
from selfimprove.tasks.base import Judgement, Task

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:\n[ \t]*```|\Z)", re.S)
CODE_START = re.compile(r"^(?:def |async def |class |import |from \S+ import )")
NO_PROGRAM = "no program: the completion has no code block and no definition"


def extract_program(text: str) -> str | None:
    """The program a completion answers with, or None if it holds none."""
    blocks = [code for language, code in FENCE.findall(text) if language.lower() in ("", "python", "py", "python3")]
    for code in blocks:
        if code.strip():
            return code.strip("\n")
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if CODE_START.match(line)), None)
    if start is None:
        return None
    # Bare code runs on into prose ("This function ..."): keep the longest start that parses.
    for end in range(len(lines), start, -1):
        code = "\n".join(lines[start:end]).rstrip()
        if _parses(code):
            return code
    return None


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def fenced(program: str) -> str:
    """A program as a gold answer writes it."""
    return f"```python\n{program.strip()}\n```"


def uses_classes(problem: dict) -> bool:
    """Whether the tests name a class the reference program defines: they need the program's objects, so they run
    in its process (`sandbox.run_tests(by_value=False)`)."""
    try:
        tree = ast.parse(problem.get("answer") or "")
    except (SyntaxError, ValueError):
        return False
    tests = "\n".join([problem.get("setup") or "", *problem["tests"]])
    return any(re.search(rf"\b{node.name}\b", tests) for node in tree.body if isinstance(node, ast.ClassDef))


def defines(program: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", program, re.M) is not None


def judgement(verdict: Verdict, flags: list[str], flagged: str) -> Judgement:
    """The sandbox's verdict on a program that carries the monitor's `flags`, as a judgement: with `flagged` "fail"
    (`task.sandbox.flagged`) a flagged pass fails, its verdict naming the flags; with "count" it stands."""
    said = f"{verdict.status}: {verdict.detail}"
    if verdict.passed and flags and flagged == "fail":
        return Judgement(False, f"flagged ({', '.join(flags)}): {said}", verdict.judged, tuple(flags))
    return Judgement(verdict.passed, said, verdict.judged, tuple(flags))


class CodeTask(Task):
    """A task whose answers are programs judged by tests; subclasses say where problems come from."""

    instruction = "Write a Python function that does what the question asks. Answer with the code in a ```python block."
    # Hand-written; no generated, MBPP or HumanEval problem asks for it.
    example = (
        "Write a function `count_long(words, n)` that returns how many of the words have more than n letters. "
        "For example, count_long(['sun', 'planet'], 3) == 1.",
        fenced("def count_long(words, n):\n    return sum(1 for word in words if len(word) > n)"),
    )
    verify_cpus = 1
    votes = False  # programs are not voted on: pass@k replaces maj@k

    def __init__(self, cfg):
        super().__init__(cfg)
        # Which isolation programs will run in (and a machine that has none fails here, before any Ray work).
        self.isolation = isolation(cfg.sandbox.isolation, cfg.sandbox.allow_weak)

    @property
    def verify_concurrency(self) -> int:
        return self.cfg.sandbox.workers

    def check(self, text: str, problem: dict) -> bool:
        return self.judge(text, problem).correct

    def judge(self, text: str, problem: dict) -> Judgement:
        program = extract_program(text)
        if program is None:
            return Judgement(False, NO_PROGRAM)
        flags = monitor.flags(program)  # the model's own code, before any stub
        entry, stub = problem.get("entry_point") or "", problem.get("stub") or ""
        if stub:
            program = stub + ("\n" if entry and defines(program, entry) else "") + program
        verdict = run_tests(program, list(problem["tests"]), self.cfg.sandbox, problem.get("setup") or "",
                            by_value=not uses_classes(problem))
        return judgement(verdict, flags, self.cfg.sandbox.flagged)

    def flags(self, text: str) -> list[str]:
        return monitor.flags(extract_program(text) or "")

    def verify(self, text: str, gold: str) -> bool:
        raise TypeError(f"task '{self.name}' checks programs by running its tests: call check(text, problem)")

    def answer_key(self, text: str) -> str | None:
        return extract_program(text)
