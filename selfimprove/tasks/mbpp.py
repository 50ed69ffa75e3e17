"""MBPP: mostly basic Python problems (Austin et al., 2021).

`task.data` is a local file or folder in MBPP's JSONL format (one object a line: `text`, `code`,
`test_list`, optional `test_setup_code` and `task_id`; a folder holds `<split>.jsonl`) or a hub dataset
with MBPP's columns; the default is google-research-datasets/mbpp ("full": train, test, validation,
prompt). As in the paper, the question shows the problem and its first test, so the model knows the
function's name and signature; all of `test_list` are the tests.
"""

from __future__ import annotations

import re

from selfimprove.tasks.code import CodeTask, fenced
from selfimprove.tasks.files import read_rows

HUB_NAME = "google-research-datasets/mbpp"
CALLED = re.compile(r"assert\s+(?:not\s+)?\(?\s*(?:math\.isclose\(\s*|set\(\s*)?([A-Za-z_]\w*)\s*\(")


def to_row(raw: dict) -> dict:
    """A task row from a raw MBPP row; ValueError if its tests are not a non-empty list of strings."""
    tests = raw["test_list"]
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t.strip() for t in tests):
        raise ValueError("'test_list' must be a non-empty list of test statements")
    called = CALLED.match(tests[0].strip())
    code = str(raw["code"]).replace("\r\n", "\n")
    return {"question": f"{str(raw['text']).strip()} Your code should pass this test: {tests[0].strip()}",
            "answer": code, "solution": fenced(code), "tests": tests, "setup": str(raw.get("test_setup_code") or ""),
            "entry_point": called.group(1) if called else "", "stub": ""}


class MBPP(CodeTask):
    name = "mbpp"

    def read(self, split: str) -> list[dict]:
        return read_rows(self.cfg.data or HUB_NAME, split, ("text", "code", "test_list"), to_row, hub_config="full")
