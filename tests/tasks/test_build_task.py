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
