"""The guide -> solver pipeline on real engines: two actor pools in one Ray Data stream, and guidance written
elsewhere going to the solver pool alone."""

import json

import pytest

from selfimprove.config import RolloutConfig, TaskConfig
from selfimprove.guidance import INSTRUCTION, solver_prompt
from selfimprove.io import is_done
from selfimprove.rollout.guided import Pool, given_guidance, guide_requests, guided_rollout
from selfimprove.tasks import build_task

CFG = RolloutConfig(max_tokens=48, batch_size=4, max_model_len=512, cpu_kvcache_gib=1)


@pytest.fixture(scope="module")
def task():
    return build_task(TaskConfig(generated_train=20, generated_test=20))


@pytest.mark.engine
def test_questions_flow_through_the_guide_pool_into_the_solver_pool(ray_local, bundled_model, task, tmp_path):
    """3 questions x 2 guidances x 2 solver samples = 12 rows, each with the guide's guidance and the solver's
    answer to a prompt that holds it; the solver samples of one guidance are drawn with its own seed."""
    problems = task.load("test")[:3]
    rows = guide_requests(problems, 2, 0.8, seed=3)
    samples = guided_rollout(task, rows, Pool(bundled_model, CFG), Pool(bundled_model, CFG), {"solve": (2, 0.8)},
                             3, tmp_path / "samples", number_free=False).to_pylist()
    assert is_done(tmp_path / "samples")
    by_id = {p["id"]: p for p in problems}
    assert [(s["problem_id"], s["guidance_index"], s["sample_index"]) for s in samples] == [
        (p["id"], g, i) for p in problems for g in (0, 1) for i in (0, 1)]
    for s in samples:
        assert s["guide_status"] == s["status"] == "ok" and s["guide_tokens"] > 0 and s["completion_tokens"] > 0
        assert INSTRUCTION in s["guide_prompt_text"] and s["question"] in s["guide_prompt_text"]
        hint = solver_prompt(task, by_id[s["problem_id"]], s["guidance"])[-1]["content"]
        assert s["guidance"].strip() and hint in s["prompt_text"]  # the solver saw the guidance
    first = {(s["problem_id"], s["guidance_index"]): s["guidance"] for s in samples if s["sample_index"] == 0}
    assert all(s["guidance"] == first[s["problem_id"], s["guidance_index"]] for s in samples)
    # Each pool's one engine sent its start-up record with its rows (the guide's on through the solver's), and the
    # driver wrote both beside the samples.
    records = [json.loads(p.read_text()) for p in (tmp_path / "engines").glob("*.json")]
    assert len(records) == 2 and all(r["began"] <= r["ready"] for r in records), records


@pytest.mark.engine
def test_written_guidance_skips_the_guide_and_a_bad_or_too_long_one_is_kept_undrawn(ray_local, bundled_model, task,
                                                                                    tmp_path):
    problems = task.load("test")[:2]
    guidances = [(problems[0]["id"], task.guidance(problems[0])),
                 (problems[0]["id"], f"The answer is {int(problems[0]['answer']) + 1000}."),
                 (problems[1]["id"], "Read the question again. " * 150)]  # about 900 tokens: past the context
    samples = guided_rollout(task, given_guidance(problems, guidances), Pool(bundled_model, CFG), None,
                             {"check": (1, 0.0)}, 3, tmp_path / "samples").to_pylist()
    assert [(s["problem_id"], s["guidance_index"], s["status"]) for s in samples] == [
        (problems[0]["id"], 0, "ok"), (problems[0]["id"], 1, "skipped=computed_number"),
        (problems[1]["id"], 0, "skipped=too_long")]
    assert samples[0]["completion_tokens"] > 0 and samples[1]["text"] == samples[2]["text"] == ""
    assert not samples[1]["correct"] and not samples[2]["correct"]
