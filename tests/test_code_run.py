"""A real SIPF run on the generated code task: programs verified in the sandbox inside the rollout stream,
step values from completions of line prefixes tested the same way, ORPO pairs, training, pass@k."""

import json

import pytest
import yaml
from processes import TINY_RUN, start

CODE_RUN = {**TINY_RUN, "recipe": "sipf", "task": {"name": "functions", "train_size": 6, "test_size": 6,
                                                    "generated_train": 50, "generated_test": 20},
            "rollout": {**TINY_RUN["rollout"], "max_tokens": 96},
            "process": {"split": "newline", "k": 2, "max_steps": 4, "max_tokens": 64},
            "pairs": {"pairs_per_problem": 1, "include_gold": True}}


@pytest.mark.engine
@pytest.mark.slow  # ~5 min: make test-slow; make test keeps the sandbox, verification-step and step-value tests
def test_sipf_runs_on_code_with_sandboxed_verification(tmp_path, bundled_model):
    config, run_dir, log = tmp_path / "code.yaml", tmp_path / "run", tmp_path / "run.log"
    config.write_text(yaml.safe_dump(CODE_RUN))
    proc = start(config, run_dir, log)
    proc.wait(timeout=1500)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    samples = run_dir / "iter_1" / "rollout" / "samples"
    import pyarrow.parquet as pq

    rows = pq.read_table(samples).to_pylist()
    assert len(rows) == 6 * 4 and all(r["verdict"] for r in rows)
    assert {r["verdict"].split(":")[0] for r in rows} <= {"passed", "failed", "crashed", "timeout", "memory",
                                                          "no program"}
    assert all(r["correct"] == r["verdict"].startswith("passed") for r in rows)
    steps = pq.read_table(run_dir / "iter_1" / "process" / "steps.parquet").to_pylist()
    assert steps and all(s["value"] is None or 0 <= s["value"] <= 1 for s in steps)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]
    assert all("pass@2" in m and "maj@2" not in m for m in metrics)  # programs do not vote
    # The monitor's counts: every sample's flags in the rollout's stats.json, the eval's share in metrics and report.
    stats = json.loads((run_dir / "iter_1" / "rollout" / "stats.json").read_text())
    assert (stats["samples"], stats["passed"], stats["flagged_passes"]) == (
        len(rows), sum(r["correct"] for r in rows), sum(r["correct"] and bool(r["flags"]) for r in rows))
    assert all(0 <= m["flagged_pass_share"] <= 1 and 0 <= m["judged_by_value"] <= 1 for m in metrics)
    assert "| flagged passes |" in (run_dir / "report.md").read_text()
    assert "pass@2" in out and (run_dir / "iter_1" / "train" / "model" / "config.json").is_file()
