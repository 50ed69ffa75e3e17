"""Tasks: where problems come from, how they are asked, how answers are checked.

`build_task(cfg)` is the one entry point: it returns the task named by `cfg.name`.
"""

from __future__ import annotations

from selfimprove.config import TaskConfig
from selfimprove.errors import UserError
from selfimprove.tasks.arc import ARC
from selfimprove.tasks.arithmetic import Arithmetic
from selfimprove.tasks.base import Task
from selfimprove.tasks.functions import Functions
from selfimprove.tasks.gsm8k import GSM8K
from selfimprove.tasks.humaneval import HumanEval
from selfimprove.tasks.math import MATH
from selfimprove.tasks.mbpp import MBPP

TASKS: dict[str, type[Task]] = {task.name: task for task in (Arithmetic, ARC, GSM8K, MATH, Functions, MBPP, HumanEval)}


def build_task(cfg: TaskConfig) -> Task:
    """The task `cfg.name` names, configured by `cfg`; UserError for an unknown name."""
    if cfg.name not in TASKS:
        raise UserError(f"unknown task '{cfg.name}' (known: {', '.join(TASKS)})")
    return TASKS[cfg.name](cfg)


__all__ = ["Task", "TASKS", "build_task"]
