"""The rollout stage for real: Ray local mode, Ray Data, vLLM engines in actors, the bundled model.

The module's main rollout runs one actor with batches of 2 over a greedy and a sampled
pass; a second rollout spreads the same requests over two actors, one of which is killed
mid-stage (the same rows). No test asserts that a rerun writes the same texts: vLLM's engine
process starts on requests as they reach it, so a rerun's batches, and with them the
floating-point path, can differ (CI, 2026-12-03: one sample of 16 differed).
"""

import dataclasses
import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from processes import named

from selfimprove.config import RolloutConfig, TaskConfig
from selfimprove.errors import UserError
from selfimprove.io import is_done, stage_output
from selfimprove.rollout.generator import SKIPPED
from selfimprove.rollout.stage import (
    AHEAD,
    SAMPLE_ORDER,
    SAMPLE_SCHEMA,
    ahead_record,
    batch_bounds,
    batch_count,
    check_complete,
    drawn_ahead,
    expected_samples,
    request_rows,
    rollout,
    verify_batch,
)
from selfimprove.tasks import build_task

N = 3
CFG = RolloutConfig(n=N, max_tokens=48, batch_size=2, max_model_len=512, cpu_kvcache_gib=1)
PASSES = {"greedy": (1, 0.0), "sample": (N, 0.8)}


@pytest.fixture(scope="module")
def task():
    return build_task(TaskConfig(generated_train=20, generated_test=20))


@pytest.fixture(scope="module")
def problems(task):
    rows = task.load("test")[:3]
    # About 1,500 tokens: more than max_model_len, so it must come back skipped, not crash.
    long = dict(rows[0], id="arithmetic-test-long", question="Tom has 3 apples. " * 250 + "How many apples?")
    return rows + [long]


@pytest.fixture(scope="module")
def one_actor(ray_local, bundled_model, task, problems, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "samples"
    table = rollout(bundled_model, CFG, task, request_rows(task, problems, PASSES, seed=7), out)
    return out, table


@pytest.mark.engine
def test_rows_schema_and_marker(one_actor, problems):
    out, table = one_actor
    assert is_done(out) and not out.with_name("samples.partial").exists()
    assert table.num_rows == len(problems) * (1 + N)
    types = dict(zip(table.schema.names, table.schema.types))
    assert {k: types[k] for k in ("problem_id", "sample_index", "text", "prompt_tokens", "completion_tokens",
                                  "finish_reason", "status", "extracted", "correct")} == {
        "problem_id": pa.string(), "sample_index": pa.int64(), "text": pa.string(), "prompt_tokens": pa.int64(),
        "completion_tokens": pa.int64(), "finish_reason": pa.string(), "status": pa.string(),
        "extracted": pa.string(), "correct": pa.bool_()}
    rows = table.to_pylist()
    assert sorted((r["pass"], r["problem_id"], r["sample_index"]) for r in rows) == sorted(
        [("greedy", p["id"], 0) for p in problems] + [("sample", p["id"], j) for p in problems for j in range(N)])


@pytest.mark.engine
def test_the_engine_records_its_start_up_beside_the_samples(one_actor):
    out, _ = one_actor
    records = [json.loads(f.read_text()) for f in out.with_name("engines").glob("*.json")]
    assert len(records) == 1 and set(records[0]) == {"began", "ready"}
    assert records[0]["began"] < records[0]["ready"] <= time.time()


@pytest.mark.engine
def test_correct_is_the_tasks_verdict(one_actor, task):
    rows = [r for r in one_actor[1].to_pylist() if r["status"] == "ok"]
    assert len(rows) == 3 * (1 + N)
    assert all(r["completion_tokens"] > 0 and r["prompt_tokens"] > 0 for r in rows)
    assert [r["correct"] for r in rows] == [task.verify(r["text"], r["answer"]) for r in rows]
    assert [r["extracted"] for r in rows] == [task.answer_key(r["text"]) for r in rows]


@pytest.mark.engine
def test_too_long_prompt_is_kept_as_skipped(one_actor):
    rows = [r for r in one_actor[1].to_pylist() if r["problem_id"] == "arithmetic-test-long"]
    assert len(rows) == 1 + N
    assert all(r["status"] == SKIPPED and r["text"] == "" and not r["correct"] for r in rows)
    assert all(r["prompt_tokens"] >= CFG.max_model_len for r in rows)


@pytest.mark.engine
def test_two_actors_one_killed_give_the_same_rows(one_actor, ray_local, bundled_model, task, problems, tmp_path):
    """Another pool shape (two actors, batches of one) writes the same rows, counts and schema, although one of
    its engine actors is SIGKILLed once the first samples are written: Ray restarts it and retries its batch
    (rollout.actor_restarts), and the stage holds each (problem, sample) exactly once. Not the same texts: an
    engine's batch changes the floating-point path (one and two actors wrote different texts on an AVX2 box)."""
    cfg = dataclasses.replace(CFG, num_actors=2, batch_size=1)
    killed = []

    def kill_one_actor_mid_stage():
        deadline = time.monotonic() + 600
        while not killed and time.monotonic() < deadline:
            actors = named("ray::MapWorker(MapBatches(VLLMGenerator))")
            if list((tmp_path / "samples.partial").glob("*.parquet")) and actors:
                actors[0].kill()
                killed.append(actors[0].pid)
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_actor_mid_stage, daemon=True)
    killer.start()
    table = rollout(bundled_model, cfg, task, request_rows(task, problems, PASSES, seed=7), tmp_path / "samples")
    killer.join()
    assert killed, "no actor was killed: the stage ended before its first samples were seen"
    mine, before = table.to_pylist(), one_actor[1].to_pylist()
    assert table.schema == one_actor[1].schema and is_done(tmp_path / "samples")
    keys = ("pass", "problem_id", "sample_index", "n", "temperature", "seed", "prompt_text", "prompt_tokens", "status")
    assert [tuple(r[k] for k in keys) for r in mine] == [tuple(r[k] for k in keys) for r in before]
    assert len(mine) == len(problems) * (1 + N)


@pytest.mark.engine
def test_engine_that_fails_to_start_leaves_no_finished_output(ray_local, bundled_model, task, problems, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    config = json.loads((__import__("pathlib").Path(bundled_model) / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(config, architectures=["NoSuchModelForCausalLM"])))
    with pytest.raises(UserError, match="rollout failed: "):
        rollout(str(broken), CFG, task, request_rows(task, problems[:1], {"sample": (1, 0.8)}, seed=0),
                tmp_path / "samples")
    assert not (tmp_path / "samples").exists()


def test_request_rows_seed_per_pass_and_problem(task):
    problems = task.load("test")[:2]
    rows = request_rows(task, problems, {"greedy": (1, 0.0), "sample": (4, 0.8)}, seed=0)
    assert [(r["pass"], r["problem_id"], r["n"], r["temperature"]) for r in rows] == [
        ("greedy", problems[0]["id"], 1, 0.0), ("sample", problems[0]["id"], 4, 0.8),
        ("greedy", problems[1]["id"], 1, 0.0), ("sample", problems[1]["id"], 4, 0.8)]
    assert len({r["seed"] for r in rows}) == 4 and all(0 <= r["seed"] < 2**31 for r in rows)
    assert rows == request_rows(task, problems, {"greedy": (1, 0.0), "sample": (4, 0.8)}, seed=0)
    assert rows[0]["seed"] != request_rows(task, problems, {"greedy": (1, 0.0)}, seed=1)[0]["seed"]
    assert json.loads(rows[0]["prompt"]) == task.prompt(problems[0])


def test_empty_problem_set(task):
    with pytest.raises(UserError, match="no problems to roll out for task 'arithmetic'"):
        request_rows(task, [], {"sample": (4, 0.8)}, seed=0)


def test_verify_batch_skipped_rows_are_wrong(task):
    problem = json.dumps({"id": "p", "question": "q", "answer": "5", "solution": ""})
    batch = {"text": np.array(["so 2 + 3 = 5. The answer is 5.", "The answer is 6.", ""], dtype=object),
             "problem": np.array([problem] * 3, dtype=object),
             "status": np.array(["ok", "ok", SKIPPED], dtype=object)}
    out = verify_batch(batch, task)
    assert out["correct"].tolist() == [True, False, False]
    assert out["extracted"].tolist() == ["5", "6", None]
    assert (out["judged"].tolist(), out["flags"].tolist()) == ([None] * 3, [[]] * 3)  # no program ran
    assert "problem" not in out  # not a sample column


def test_verify_batch_of_programs_records_their_verdicts_and_the_monitors_flags():
    """A pass, a pass that reads its own frame (flag `frame`), a failure that exits (`exit`), a completion with no
    code and a skipped sample: the flags column is Arrow list<string> as the samples' schema says."""
    from selfimprove.sandbox import JUDGED
    from selfimprove.tasks.code import NO_PROGRAM

    code = build_task(TaskConfig(name="functions"))
    problem = json.dumps({"id": "p", "question": "", "answer": "", "tests": ["assert double(2) == 4"], "setup": "",
                          "entry_point": "double", "stub": ""})
    texts = ["```python\ndef double(x):\n    return 2 * x\n```",
             "```python\nimport sys\ndef double(x):\n    return 2 * sys._getframe().f_locals['x']\n```",
             "```python\nimport os\ndef double(x):\n    os._exit(0)\n```", "No code.", ""]
    batch = {"text": np.array(texts, dtype=object), "problem": np.array([problem] * 5, dtype=object),
             "status": np.array(["ok"] * 4 + [SKIPPED], dtype=object)}
    out = verify_batch(batch, code)
    assert out["correct"].tolist() == [True, True, False, False, False]
    assert [v and v.split(":")[0] for v in out["verdict"]] == ["passed", "passed", "crashed", NO_PROGRAM.split(":")[0],
                                                               None]
    assert set(out["judged"][:3]) <= set(JUDGED) and out["judged"][3:].tolist() == [None, None]
    assert pa.array(out["flags"], SAMPLE_SCHEMA.field("flags").type).to_pylist() == [[], ["frame"], ["exit"], [], []]


def test_verify_batch_hands_the_task_the_whole_problem_row(task):
    class Labelled(type(task)):
        def check(self, text, problem):  # a task that verifies against another field than `answer`
            return self.verify(text, problem["label"])

    problem = json.dumps({"id": "p", "question": "q", "answer": "5", "label": "6", "solution": ""})
    batch = {"text": np.array(["The answer is 5.", "The answer is 6."], dtype=object),
             "problem": np.array([problem] * 2, dtype=object), "status": np.array(["ok", "ok"], dtype=object)}
    assert verify_batch(batch, Labelled(task.cfg))["correct"].tolist() == [False, True]


def test_check_complete_wants_each_sample_once():
    rows = [{"pass": "sample", "problem_id": "p1", "n": 2}, {"pass": "sample", "problem_id": "p2", "n": 1}]

    def table(*keys):
        return pa.table({"pass": [k[0] for k in keys], "problem_id": [k[1] for k in keys],
                         "sample_index": [k[2] for k in keys]})

    check_complete(table(("sample", "p2", 0), ("sample", "p1", 1), ("sample", "p1", 0)), SAMPLE_ORDER,
                   expected_samples(rows))
    for keys, kept in ((("sample", "p1", 0), ("sample", "p1", 1)), 2), (
            (("sample", "p1", 0), ("sample", "p1", 0), ("sample", "p2", 0)), 2), (
            (("sample", "p1", 0), ("sample", "p1", 1), ("sample", "p2", 0), ("sample", "p2", 1)), 3):
        with pytest.raises(UserError, match=rf"^rollout wrote {len(keys)} samples \({kept} of the 3 expected, "
                                            r"problems x n, each once\): not marked done; rerun to redo it$"):
            check_complete(table(*keys), SAMPLE_ORDER, expected_samples(rows))


def test_batch_count_gives_every_engine_the_same_share_of_batches():
    assert batch_count([8] * 64, 2, 16) == 4  # 16 rows each, two per engine
    assert batch_count([8] * 300, 2, 32) == 10  # 30 rows each: ceil(300 / 64) = 5 per engine
    assert batch_count([8] * 33, 2, 16) == 4  # 33 rows into 3 blocks would leave one engine a second batch alone
    assert batch_count([8] * 32, 1, 64) == 1
    assert batch_count([8] * 3, 4, 16) == 3  # fewer rows than engines: a row each
    assert batch_count([1], 2, 16) == 1


def test_batch_count_counts_samples_at_the_largest_n():
    # An eval: 200 greedy rows (n = 1) and 200 of n = 4 make 1,000 samples; a batch holds 16 x 4 = 64 at most,
    # so ceil(1000 / (2 x 64)) = 8 per engine, 16 in all (counting rows, 400 in batches of 16 would make 26).
    assert batch_count([1, 4] * 200, 2, 16) == 16


def test_batch_bounds_cut_runs_of_rows_asking_for_equal_samples():
    # An eval of 4 problems (greedy n = 1 and maj n = 4: 20 samples) with 2 training problems drawn ahead (n = 8: 16):
    # 36 samples, 18 a batch. Equal rows would be 5 and 5, asking for 10 and 26 samples.
    samples = [1, 4] * 4 + [8, 8]
    # Running sums 1, 5, 6, 10, 11, 15, 16, 20: the eighth row brings the first run to 18.
    assert batch_bounds(samples, 2) == [(0, 8), (8, 10)]  # 20 and 16 samples
    assert batch_bounds([8] * 64, 4) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert batch_bounds([8, 1, 1, 1], 2) == [(0, 1), (1, 4)]
    assert batch_bounds([1, 1, 1, 8], 3) == [(0, 2), (2, 3), (3, 4)]  # each run keeps a row for the runs after it
    assert batch_bounds([5], 1) == [(0, 1)]


def sample_row(pass_name: str, problem_id: str, index: int) -> dict:
    return {name: None for name in SAMPLE_SCHEMA.names} | {
        "pass": pass_name, "problem_id": problem_id, "sample_index": index, "n": 2, "text": f"{pass_name}{index}"}


def test_samples_drawn_ahead_are_found_only_for_the_same_model_and_requests(task, tmp_path):
    """An eval folder that drew the next rollout's requests (pass `train`) beside its own (`greedy`)."""
    problems = task.load("train")[:2]
    rows = request_rows(task, problems, {"train": (2, 0.8)}, seed=0)
    eval_dir = tmp_path / "iter_0" / "eval"
    with stage_output(eval_dir) as scratch:
        with stage_output(scratch / "samples") as samples:
            pq.write_table(pa.Table.from_pylist(
                [sample_row("greedy", p["id"], 0) for p in problems]
                + [sample_row("train", p["id"], i) for p in problems for i in (1, 0)], schema=SAMPLE_SCHEMA),
                samples / "part.parquet")
        (scratch / AHEAD).write_text(ahead_record("model-a", rows))
    drawn = drawn_ahead(eval_dir, "model-a", rows)
    assert [(r["pass"], r["problem_id"], r["sample_index"]) for r in drawn.to_pylist()] == [
        ("train", p["id"], i) for p in sorted(problems, key=lambda p: p["id"]) for i in (0, 1)]
    assert drawn_ahead(eval_dir, "model-b", rows) is None  # another model
    assert drawn_ahead(eval_dir, "model-a", request_rows(task, problems, {"train": (2, 0.7)}, seed=0)) is None
    assert drawn_ahead(tmp_path / "iter_1" / "eval", "model-a", rows) is None  # nothing there
    (eval_dir / AHEAD).write_text(ahead_record("model-a", rows[:1]))  # drew other requests
    assert drawn_ahead(eval_dir, "model-a", rows) is None
