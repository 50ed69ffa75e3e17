"""pass@1, maj@k and pass@k from verified samples, worked out by hand."""

import pytest

from selfimprove.evaluate import aggregate, majority, problem_results


@pytest.mark.parametrize("keys, expected", [
    (["3", "4", "4", "3"], 0),      # 2-2 tie: the answer seen first wins
    ([None, "4", "5", "5"], 2),     # samples without an answer do not vote
    ([None, None], None),
    (["7"], 0),
])
def test_majority(keys, expected):
    assert majority(keys) == expected


def sample(pid, pass_, index, extracted, correct, answer="5"):
    return {"problem_id": pid, "pass": pass_, "sample_index": index, "extracted": extracted,
            "correct": correct, "answer": answer}


def test_problem_results_and_aggregate():
    """p1: greedy right; samples 5, 6, 6 -> majority 6 wrong, pass@3 right.
    p2: greedy wrong; samples 5, 5, None -> majority 5 right.
    pass@1 = 1/2, maj@3 = 1/2, pass@3 = 2/2."""
    rows = problem_results([
        sample("p1", "greedy", 0, "5", True),
        sample("p1", "sample", 2, "6", False), sample("p1", "sample", 0, "5", True), sample("p1", "sample", 1, "6", False),
        sample("p2", "greedy", 0, None, False),
        sample("p2", "sample", 0, "5", True), sample("p2", "sample", 1, "5", True), sample("p2", "sample", 2, None, False),
    ])
    assert rows == [
        {"id": "p1", "gold": "5", "greedy_answer": "5", "greedy_correct": True,
         "majority_answer": "6", "majority_correct": False, "any_correct": True},
        {"id": "p2", "gold": "5", "greedy_answer": None, "greedy_correct": False,
         "majority_answer": "5", "majority_correct": True, "any_correct": True},
    ]
    assert aggregate(rows, 3) == {"problems": 2, "pass@1": 0.5, "maj@3": 0.5, "pass@3": 1.0}


def test_greedy_only():
    rows = problem_results([sample("p1", "greedy", 0, "5", True), sample("p2", "greedy", 0, "4", False),
                            sample("p3", "greedy", 0, "5", True)])
    assert aggregate(rows, 1) == {"problems": 3, "pass@1": 2 / 3}


def test_run_eval_scores_each_extra_set_in_its_own_folder_with_a_fake_rollout(tmp_path, monkeypatch):
    """Driver logic only (a fake rollout that answers 5 to everything): the task's set and each extra set are
    rolled out with their own task into their own folders, and metrics.json carries every set's figures."""
    import json

    import pyarrow as pa

    import selfimprove.evaluate
    from selfimprove.config import load_config
    from selfimprove.evaluate import run_eval

    calls = []

    def fake_rollout(model, cfg, task, rows, out):
        calls.append((task, out))
        return pa.Table.from_pylist([
            {"problem_id": r["problem_id"], "pass": r["pass"], "sample_index": i, "extracted": "5",
             "correct": r["answer"] == "5", "answer": r["answer"]} for r in rows for i in range(r["n"])])

    monkeypatch.setattr(selfimprove.evaluate, "rollout", fake_rollout)
    cfg = load_config(None, ["eval.k=2"])

    class FakeTask:
        def prompt(self, problem):
            return []

    task, task_b = FakeTask(), FakeTask()

    def problems(*answers):
        return [{"id": f"p{i}", "question": "q", "answer": a, "solution": ""} for i, a in enumerate(answers)]

    metrics = run_eval(cfg, "/m", task, problems("5", "6"), tmp_path, {"wide": (task_b, problems("5", "5", "5", "7"))},
                       name="teacher")
    assert calls == [(task, tmp_path / "samples"), (task_b, tmp_path / "extra" / "wide" / "samples")]
    assert (metrics["model"], metrics["pass@1"], metrics["extra"]) == (
        "teacher", 0.5, {"wide": {"problems": 4, "pass@1": 0.75, "maj@2": 0.75, "pass@2": 0.75}})
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == metrics
