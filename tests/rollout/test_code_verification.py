"""Code verification as its own Ray Data step: hostile samples get their verdicts and the stage finishes."""

import json

from selfimprove.config import SandboxConfig, TaskConfig
from selfimprove.io import read_table
from selfimprove.rollout.stage import SAMPLE_ORDER, SAMPLE_SCHEMA, verify_step, write_samples
from selfimprove.tasks import build_task

PROGRAMS = {  # sample index -> (completion, verdict status)
    0: ("```python\ndef double(x):\n    return 2 * x\n```", "passed"),
    1: ("```python\ndef double(x):\n    return x\n```", "failed"),
    2: ("```python\nwhile True:\n    pass\n```", "timeout"),
    3: ("```python\nimport os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n```", "timeout"),
    4: ("```python\nimport os\nos.kill(os.getppid(), 9)\n```", "crashed"),
    5: ("```python\nimport sys\nsys.exit(0)\n```", "crashed"),
    6: ("```python\nx = bytearray(50 * 2**30)\n```", "memory"),
    7: ("No code here.", None),
}


def test_hostile_samples_get_verdicts_in_a_ray_data_step_and_the_samples_are_written(ray_local, tmp_path):
    task = build_task(TaskConfig(name="functions", sandbox=SandboxConfig(timeout=3, cpu_seconds=1, workers=2)))
    problem = {"id": "p", "question": "Write double(x).", "answer": "def double(x):\n    return 2 * x",
               "solution": "", "tests": ["assert double(2) == 4", "assert double(5) == 10"], "setup": "",
               "entry_point": "double", "stub": ""}
    rows = [{"pass": "sample", "problem_id": "p", "question": problem["question"], "answer": problem["answer"],
             "n": len(PROGRAMS), "temperature": 0.8, "seed": 1, "prompt_text": "", "sample_index": i, "text": text,
             "prompt_tokens": 1, "completion_tokens": 1, "finish_reason": "stop", "status": "ok",
             "problem": json.dumps(problem)} for i, (text, _) in PROGRAMS.items()]
    ds = ray_local.data.from_items(rows, override_num_blocks=4)
    samples = write_samples(verify_step(ds, task), tmp_path / "samples", SAMPLE_SCHEMA, SAMPLE_ORDER,
                            {("sample", "p", i) for i in PROGRAMS}).to_pylist()
    assert (tmp_path / "samples" / "_SUCCESS").exists()
    assert [s["correct"] for s in samples] == [True] + [False] * 7
    assert [s["verdict"].split(":")[0] for s in samples] == [status or "no program" for _, status in PROGRAMS.values()]
    # Arrow types from Ray Data's blocks, as the schema says: the first block's flags are all empty lists.
    assert [s["flags"] for s in samples] == [[], [], [], [], ["exit"], ["exit"], [], []]
    assert [s["judged"] is None for s in samples] == [False] * 7 + [True]  # no program, nothing judged
    assert read_table(tmp_path / "samples", SAMPLE_ORDER).num_rows == len(PROGRAMS)
