"""Monte Carlo step values: the pure math, the scoring bookkeeping, and a real vLLM engine in a Ray actor.

The fast tests drive `score_samples` with a scripted `complete`: from a prefix whose last
"r=N" marker says N, its draws 0..N-1 state the gold answer 8 and later draws state 0; from a
prefix with no marker, an empty completion (so only the prefix can reach the answer); and
nothing for a prompt over LIMIT characters (too long for the context).
The engine tests put the real engine behind the same `complete`.
"""

import dataclasses
import re

import pyarrow.parquet as pq
import pytest

from selfimprove.config import ProcessConfig, RolloutConfig, TaskConfig
from selfimprove.reward.mc_prm import (
    MCPRM,
    STEP_SCHEMA,
    first_error_labels,
    first_zero,
    next_draws,
    pool_complete,
    score_samples,
    search_probe,
    search_start,
    search_update,
    step_value,
    write_steps,
)
from selfimprove.rollout.generator import SKIPPED
from selfimprove.rollout.stage import request_seed
from selfimprove.tasks import build_task

K = 4
LIMIT = 100


@pytest.fixture(scope="module")
def task():
    return build_task(TaskConfig(generated_train=20, generated_test=20))


def test_step_value_soft_and_hard():
    assert step_value(2, 4, "soft") == 0.5 and step_value(2, 4, "hard") == 1.0
    assert step_value(0, 4, "soft") == 0.0 and step_value(0, 4, "hard") == 0.0
    assert step_value(4, 4, "soft") == 1.0


def search(n: int, zero) -> tuple[list[int], int]:
    """(probes made, first error) of the search over n steps, `zero(step)` saying which are 0."""
    state, probes = search_start(n, correct=False), []
    while (p := search_probe(*state)) is not None:
        probes.append(p)
        state = search_update(*state, p, zero(p))
    return probes, state[1]


def test_search_gallops_from_step_0_then_halves():
    """Values [1, .5, 0, 0, 0]: gallop 0 (1), 1 (.5), 3 (0) -> bounds (2, 3), halve: 2 (0): first error 2.
    A 0 first step: 1 probe. Eight steps, only the last 0: 0, 1, 3, then 7 capped to hi - 1 = 6: 4 probes.
    Eight steps, first error 5: 0, 1, 3, 6 (0) -> (4, 6), halve: 5 (0) -> (4, 5), 4 (1) -> first error 5."""
    values = [1.0, 0.5, 0.0, 0.0, 0.0]
    assert search(5, lambda p: values[p] == 0) == ([0, 1, 3, 2], 2) and first_zero(values) == 2
    assert search(5, lambda p: True) == ([0], 0)
    assert search(8, lambda p: p == 7) == ([0, 1, 3, 6], 7)
    assert search(8, lambda p: p >= 5) == ([0, 1, 3, 6, 5, 4], 5)
    assert search_start(3, correct=True) is None and search_probe(*search_start(1, correct=False)) is None


def test_draws_double_up_to_k():
    """k = 4: 1, 1, 2; k = 8: 1, 1, 2, 4; k = 3: 1, 1, 1; k = 1: 1."""
    def rounds(k):
        drawn, out = 0, []
        while drawn < k:
            out.append(next_draws(drawn, k))
            drawn += out[-1]
        return out

    assert rounds(4) == [1, 1, 2] and rounds(8) == [1, 1, 2, 4] and rounds(3) == [1, 1, 1] and rounds(1) == [1]


def test_first_error_labels_and_first_zero():
    assert first_error_labels(5, 2) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert first_error_labels(3, None) == [1.0, 1.0, 1.0] and first_error_labels(1, 0) == [0.0]
    assert first_zero([1.0, 0.5, 0.0, 0.0]) == 2 and first_zero([1.0, None, 0.0]) == 1 and first_zero([1.0]) is None


def sample(pid, i, text, correct, status="ok"):
    return {"problem_id": pid, "sample_index": i, "prompt_text": f"{pid}/{i}|", "text": text, "answer": "8",
            "status": status, "correct": correct}


SAMPLES = [
    sample("p0", 0, "a r=4\nb r=2\nc r=0\nd r=0\nThe answer is 5.", False),
    sample("p0", 1, "a r=1\nb r=3\nThe answer is 8.", True),
    sample("p2", 0, "The answer is 3.", False),                                   # one step
    sample("p3", 0, " \n", False),                                                # no step
    sample("p4", 0, "", False, SKIPPED),                                          # never generated
    sample("p5", 0, "a r=3\n" + "long " * 30 + "r=0\nThe answer is 1.", False),  # step 1 over LIMIT
    sample("p6", 0, "So the answer is 8.\nwait r=0\nThe answer is 2.", False),    # step 0 states the answer
]


class Scripted:
    """The scripted `complete`, keeping every call's (prompt, seed) pairs; the j-th request of a prompt is draw j."""

    def __init__(self):
        self.calls, self.draws = [], {}

    def __call__(self, prompts, seeds, temperature):
        self.calls.append(list(zip(prompts, seeds)))
        out = []
        for p in prompts:
            j = self.draws[p] = self.draws.get(p, -1) + 1
            r = re.findall(r"r=(\d)", p)
            out.append(None if len(p) > LIMIT else "" if not r else
                       "\nThe answer is 8." if j < int(r[-1]) else "\nThe answer is 0.")
        return out


def by_sample(rows):
    out = {}
    for r in rows:
        out.setdefault((r["problem_id"], r["sample_index"]), []).append(r)
    return out


def col(rows, key):
    return [r[key] for r in rows]


def test_full_scan(task):
    """Every step but the last is rolled out K=4 times; the last is the sample's outcome.
    p0/0: r = 4, 2, 0, 0 -> 1, .5, 0, 0, then outcome 0. p0/1: .25, .75, outcome 1. p2: outcome 0 alone.
    p5: .75, then too long, outcome 0. p6: the prefix "So the answer is 8." with empty completions
    reaches 8 (4 of 4); "wait r=0" then states 0 -> 0. Rollouts 4 x (4 + 2 + 1 + 2) = 36, one round."""
    complete = Scripted()
    rows, stats = score_samples(complete, SAMPLES, task, ProcessConfig(k=K), seed=3)
    got = by_sample(rows)
    assert list(got) == [("p0", 0), ("p0", 1), ("p2", 0), ("p5", 0), ("p6", 0)]
    assert col(got["p0", 0], "value") == [1.0, 0.5, 0.0, 0.0, 0.0]
    assert col(got["p0", 0], "reached") == [4, 2, 0, 0, None]
    assert col(got["p0", 0], "rollouts") == [4, 4, 4, 4, 0]
    assert col(got["p0", 0], "source") == ["rollout"] * 4 + ["outcome"]
    assert col(got["p0", 1], "value") == [0.25, 0.75, 1.0]
    assert col(got["p2", 0], "value") == [0.0] and col(got["p2", 0], "source") == ["outcome"]
    assert col(got["p5", 0], "value") == [0.75, None, 0.0]
    assert col(got["p5", 0], "source") == ["rollout", SKIPPED, "outcome"] and col(got["p5", 0], "rollouts") == [4, 0, 0]
    assert col(got["p6", 0], "value") == [1.0, 0.0, 0.0] and col(got["p6", 0], "reached") == [4, 0, None]
    assert stats == {"samples": 5, "not_generated": 1, "no_steps": 1, "single_step": 1, "capped": 0, "steps": 15,
                     "too_long": 1, "rollouts": 36, "rounds": 1}
    # Spans, texts and the prompt each prefix was rolled out from.
    first = got["p0", 0][1]
    assert (first["step_index"], first["start"], first["end"], first["text"]) == (1, 6, 11, "b r=2")
    (call,) = complete.calls
    assert [s for p, s in call if p == "p0/0|a r=4\nb r=2"] == [request_seed(3, "mc", "p0", 0, 1, j) for j in range(4)]
    assert len(call) == 4 * (4 + 2 + 2 + 2) and len({s for _, s in call}) == len(call)


def test_hard_labels_and_capped_steps(task):
    """Hard: p0/1's .25 and .75 become 1. max_steps 3 keeps p0/0's a and b and scores "c ... 5." by its outcome."""
    rows, stats = score_samples(Scripted(), SAMPLES[:2], task, ProcessConfig(k=K, label="hard", max_steps=3), seed=0)
    got = by_sample(rows)
    assert col(got["p0", 0], "value") == [1.0, 1.0, 0.0]
    assert col(got["p0", 0], "text")[-1] == "c r=0\nd r=0\nThe answer is 5."
    assert col(got["p0", 1], "value") == [1.0, 1.0, 1.0]
    assert stats["capped"] == 1 and stats["rollouts"] == 4 * (2 + 2)


def test_first_error_search_agrees_with_the_full_scan_in_fewer_rollouts(task):
    """Right samples are not rolled out; a probe's draws come 1, 1, 2 and stop at the first success.
    p0/0 (r = 4, 2, 0, 0): probe 0 alive at draw 0, probe 1 alive at draw 0, probe 3 dead after 4 draws
    (3 rounds) -> bounds (2, 3), probe 2 dead after 4: first error 2, 1 + 1 + 4 + 4 = 10 rollouts, 8 rounds.
    p2: one step, error 0, none. p5: probe 0 alive at draw 0, probe 1 too long (counts as the error): 1.
    p6: probe 0 ("So the answer is 8.", empty completion) alive at draw 0, probe 1 dead after 4: 5.
    16 rollouts in 8 rounds, not 36 in 1; every (prompt, seed) drawn is one the full scan draws."""
    cfg = ProcessConfig(k=K, search="first_error")
    complete = Scripted()
    rows, stats = score_samples(complete, SAMPLES, task, cfg, seed=3)
    got = by_sample(rows)
    assert col(got["p0", 0], "value") == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert col(got["p0", 0], "source") == ["rollout"] * 4 + ["outcome"]
    assert col(got["p0", 0], "reached") == [1, 1, 0, 0, None] and col(got["p0", 0], "rollouts") == [1, 1, 4, 4, 0]
    assert col(got["p0", 1], "value") == [1.0, 1.0, 1.0]
    assert col(got["p0", 1], "source") == ["inferred", "inferred", "outcome"]
    assert col(got["p2", 0], "value") == [0.0]
    assert col(got["p5", 0], "value") == [1.0, None, 0.0] and col(got["p5", 0], "rollouts") == [1, 0, 0]
    assert col(got["p5", 0], "source") == ["rollout", SKIPPED, "outcome"]
    assert col(got["p6", 0], "value") == [1.0, 0.0, 0.0] and col(got["p6", 0], "rollouts") == [1, 4, 0]
    assert stats["rollouts"] == 16 and stats["rounds"] == 8 and stats["too_long"] == 1
    long = "p5/0|a r=3\n" + ("long " * 30).strip() + " r=0"
    assert [sorted(p for p, _ in c) for c in complete.calls[:4]] == [
        ["p0/0|a r=4", "p5/0|a r=3", "p6/0|So the answer is 8."],
        ["p0/0|a r=4\nb r=2", long, "p6/0|So the answer is 8.\nwait r=0"],
        ["p0/0|a r=4\nb r=2\nc r=0\nd r=0", "p6/0|So the answer is 8.\nwait r=0"],
        ["p0/0|a r=4\nb r=2\nc r=0\nd r=0", "p6/0|So the answer is 8.\nwait r=0", "p6/0|So the answer is 8.\nwait r=0"]]
    full = Scripted()
    full_rows, _ = score_samples(full, SAMPLES, task, ProcessConfig(k=K), seed=3)
    assert {d for c in complete.calls for d in c} <= set(full.calls[0])
    full_got = by_sample(full_rows)
    assert {key: first_zero(col(r, "value")) for key, r in got.items()} == {
        key: first_zero(col(r, "value")) for key, r in full_got.items()} == {
        ("p0", 0): 2, ("p0", 1): None, ("p2", 0): 0, ("p5", 0): 1, ("p6", 0): 1}


def test_steps_parquet_schema(task, tmp_path):
    rows, _ = score_samples(Scripted(), SAMPLES, task, ProcessConfig(k=K), seed=0)
    write_steps(rows, tmp_path / "steps.parquet")
    table = pq.read_table(tmp_path / "steps.parquet")
    assert table.schema == STEP_SCHEMA and table.to_pylist() == rows
    write_steps([], tmp_path / "empty.parquet")
    assert pq.read_table(tmp_path / "empty.parquet").schema == STEP_SCHEMA


# -- a real engine ------------------------------------------------------------------------------

ENGINE = RolloutConfig(max_tokens=24, max_model_len=512, cpu_kvcache_gib=1, seed=0)


@pytest.fixture(scope="module")
def engine_complete(ray_local, bundled_model, task):
    """`complete` over one MCPRM actor on the bundled model, keeping what it wrote for failure messages.
    No core binding: binding waits for a free per-core slot lock, which other engines on the machine may hold."""
    actor = ray_local.remote(num_cpus=1)(MCPRM).remote(bundled_model, ENGINE, task.stop)
    written = {}

    def complete(prompts, seeds, temperature):
        outs = pool_complete([actor], prompts, seeds, temperature)
        written.update((p[-60:], o) for p, o in zip(prompts, outs))
        return outs

    complete.written = written
    yield complete
    ray_local.kill(actor)


@pytest.fixture(scope="module")
def engine_samples(task, bundled_model):
    """A prompt as the rollout stage templates it, and: a wrong sample whose first step is the gold solution
    in the one-shot example's form and whose second restates its answer; the gold solution one sentence a
    line (right); a wrong sample whose first step is too long for the context.

    (A bare "The answer is 19." as a first step is no forced case on this model: one of two completions went
    on to state another answer, and the last stated answer is the one that counts.)"""
    from transformers import AutoTokenizer

    problem = next(p for p in task.load("test") if len(p["key"].split()) == 5)  # the first two-step problem
    tokenizer = AutoTokenizer.from_pretrained(bundled_model)
    prompt = tokenizer.apply_chat_template(task.prompt(problem), tokenize=False, add_generation_prompt=True)
    gold, wrong = problem["answer"], str(int(problem["answer"]) + 1)

    def row(i, text):
        return {"problem_id": problem["id"], "sample_index": i, "prompt_text": prompt, "text": text, "answer": gold,
                "status": "ok", "correct": task.verify(text, gold)}

    return [row(0, f"{problem['solution']}\nSo the answer is {gold}.\nThe answer is {wrong}."),
            row(1, problem["solution"].replace(". ", ".\n")),
            row(2, "Tom has 3 apples. " * 150 + f"\nThe answer is {wrong}.")]


@pytest.fixture(scope="module")
def full_and_search(engine_complete, engine_samples, task):
    cfg = ProcessConfig(k=2, temperature=0.8)
    full = score_samples(engine_complete, engine_samples, task, cfg, seed=0)
    search = score_samples(engine_complete, engine_samples, task, dataclasses.replace(cfg, search="first_error"), seed=0)
    return full, search


@pytest.mark.engine
def test_a_prefix_stating_the_gold_answer_scores_1(full_and_search, engine_complete):
    (rows, stats), _ = full_and_search
    forced = [r for r in rows if r["sample_index"] == 0]
    assert col(forced, "value") == [1.0, 1.0, 0.0], engine_complete.written
    assert col(forced, "reached") == [2, 2, None] and col(forced, "source") == ["rollout", "rollout", "outcome"]
    right = [r for r in rows if r["sample_index"] == 1]
    assert len(right) == 4 and right[-1]["value"] == 1.0
    assert all(r["rollouts"] == 2 and r["value"] in (0.0, 0.5, 1.0) for r in right[:-1])


@pytest.mark.engine
def test_too_long_prefix_is_skipped_not_fatal(full_and_search):
    (rows, stats), _ = full_and_search
    long = [r for r in rows if r["sample_index"] == 2]
    assert col(long, "value") == [None, 0.0] and col(long, "source") == [SKIPPED, "outcome"]
    assert stats["too_long"] == 1 and stats["rollouts"] == 2 * (2 + 3)


@pytest.mark.engine
def test_first_error_search_agrees_on_the_forced_case(full_and_search):
    """Forced: gallop probes 0 (the gold solution) and 1 (states the answer), each alive at its first draw, as
    the full scan found both steps 2 of 2: first error 2, 2 rollouts instead of 4. The right sample is not
    rolled out; the long one's only probe is too long."""
    (full, full_stats), (search, search_stats) = full_and_search
    forced = [r for r in search if r["sample_index"] == 0]
    assert col(forced, "value") == [1.0, 1.0, 0.0] and col(forced, "source") == ["rollout", "rollout", "outcome"]
    assert col(forced, "reached") == [1, 1, None] and col(forced, "rollouts") == [1, 1, 0]
    for i in (0, 2):
        assert first_zero(col([r for r in search if r["sample_index"] == i], "value")) == first_zero(
            col([r for r in full if r["sample_index"] == i], "value"))
    assert search_stats["rollouts"] == 2 < full_stats["rollouts"]


def test_engines_that_cannot_be_placed_fail_in_one_line_within_the_start_timeout(ray_local, bundled_model):
    """An engine pool asking more cores than any node has is refused after rollout.start_timeout, not waited
    for forever; its actors are released."""
    from selfimprove.errors import UserError
    from selfimprove.reward.mc_prm import prm_actors

    cfg = RolloutConfig(cpus_per_actor=64, start_timeout=1)
    with pytest.raises(UserError, match=r"^process scoring failed: 1 of 1 engines were not scheduled and started "
                                        r"within rollout.start_timeout=1 s"):
        with prm_actors(bundled_model, cfg, ()):
            pass
