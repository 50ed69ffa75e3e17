"""pass@1, maj@k and pass@k from verified samples, worked out by hand."""

import pytest

from selfimprove.evaluate import aggregate, majority, monitored, problem_results


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
         "majority_answer": "6", "majority_correct": False, "samples": 3, "samples_correct": 1},
        {"id": "p2", "gold": "5", "greedy_answer": None, "greedy_correct": False,
         "majority_answer": "5", "majority_correct": True, "samples": 3, "samples_correct": 2},
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
    from selfimprove.evaluate import run_eval
    from selfimprove.recipes import load_config

    calls, drawn = [], []

    def fake_rollout(model, cfg, task, rows, out):
        calls.append((task, out))
        drawn.append(sorted({r["pass"] for r in rows}))
        out.mkdir(parents=True, exist_ok=True)
        return pa.Table.from_pylist([
            {"problem_id": r["problem_id"], "pass": r["pass"], "sample_index": i, "extracted": "5",
             "correct": r["answer"] == "5", "answer": r["answer"]} for r in rows for i in range(r["n"])])

    monkeypatch.setattr(selfimprove.evaluate, "rollout", fake_rollout)
    cfg = load_config(None, ["eval.k=2"])

    class FakeTask:
        votes, isolation = True, None

        def prompt(self, problem):
            return []

    task, task_b = FakeTask(), FakeTask()

    def problems(*answers):
        return [{"id": f"p{i}", "question": "q", "answer": a, "solution": ""} for i, a in enumerate(answers)]

    metrics = run_eval(cfg, "/m", task, problems("5", "6"), tmp_path, {"wide": (task_b, problems("5", "5", "5", "7"))},
                       name="teacher")
    assert calls == [(task, tmp_path / "samples"), (task_b, tmp_path / "extra" / "wide" / "samples")]
    assert (metrics["model"], metrics["pass@1"], metrics["extra"]) == (
        # The report's sets take eval.extra_k samples (default 1: greedy alone), not eval.k.
        "teacher", 0.5, {"wide": {"problems": 4, "pass@1": 0.75,
                                  # 3 of 4 right, redrawn: at most one right has chance 0.4% + 4.7% (over 2.5%),
                                  # none 0.4%; all four 31.6%: the 95% interval is [0.25, 1.0].
                                  "pass_at_1_interval": [0.25, 1.0]}})
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == metrics

    # Drawing the next rollout's requests ahead: they go to the task's own set's engines, the metrics stay the
    # same, and the record names the model and the requests.
    from selfimprove.rollout.stage import ahead_record

    ahead = [{"pass": "train", "problem_id": "p0", "answer": "7", "n": 3}]
    calls.clear(), drawn.clear()
    again = run_eval(cfg, "/m", task, problems("5", "6"), tmp_path / "b", {"wide": (task_b, problems("5", "5", "5", "7"))},
                     name="teacher", ahead=ahead)
    assert again == metrics and calls == [(task, tmp_path / "b" / "samples"),
                                          (task_b, tmp_path / "b" / "extra" / "wide" / "samples")]
    assert drawn == [["greedy", "sample", "train"], ["greedy"]]
    assert (tmp_path / "b" / "ahead.json").read_text() == ahead_record("/m", ahead)


def test_code_figures_are_the_flagged_share_of_passes_and_the_share_judged_by_value():
    """3 passes, 1 flagged: 1/3. Of 4 programs run, 1 judged by value: 1/4 (the sample with no program counts in
    neither). Nothing passing or run: 0.0 each."""
    samples = [{"correct": True, "flags": ["gc"], "judged": "in_process"},
               {"correct": True, "flags": [], "judged": "value"},
               {"correct": True, "flags": [], "judged": "in_process"},
               {"correct": False, "flags": ["exit"], "judged": "in_process"},
               {"correct": False, "flags": [], "judged": None}]
    assert monitored(samples) == {"flagged_pass_share": 1 / 3, "judged_by_value": 0.25}
    assert monitored([{"correct": False, "flags": [], "judged": None}]) == {"flagged_pass_share": 0.0,
                                                                            "judged_by_value": 0.0}


def test_run_eval_of_a_code_task_counts_flagged_passes_over_both_passes_and_not_the_samples_drawn_ahead(
        tmp_path, monkeypatch):
    """A fake rollout: p0 greedy passes flagged (value), its samples pass (value) and fail flagged (in process); p1
    greedy has no program, its samples pass (in process) and pass flagged (value). 4 passes, 2 flagged: 0.5; 5
    programs ran, 3 by value: 0.6. The next rollout's sample drawn ahead (a flagged pass) counts in neither."""
    import pyarrow as pa

    import selfimprove.evaluate
    from selfimprove.evaluate import run_eval
    from selfimprove.recipes import load_config

    judged = {("p0", "greedy", 0): (True, ["frame"], "value"), ("p0", "sample", 0): (True, [], "value"),
              ("p0", "sample", 1): (False, ["exit"], "in_process"), ("p1", "greedy", 0): (False, [], None),
              ("p1", "sample", 0): (True, [], "in_process"), ("p1", "sample", 1): (True, ["gc"], "value"),
              ("p0", "train", 0): (True, ["gc"], "value")}

    def fake_rollout(model, cfg, task, rows, out):
        return pa.Table.from_pylist([
            {"problem_id": r["problem_id"], "pass": r["pass"], "sample_index": i, "extracted": "def f(): pass",
             "answer": r["answer"], **dict(zip(("correct", "flags", "judged"), judged[r["problem_id"], r["pass"], i]))}
            for r in rows for i in range(r["n"])])

    class CodeTask:
        votes, isolation = False, "bwrap"

        def prompt(self, problem):
            return []

    monkeypatch.setattr(selfimprove.evaluate, "rollout", fake_rollout)
    problems = [{"id": f"p{i}", "question": "q", "answer": "a", "solution": ""} for i in range(2)]
    metrics = run_eval(load_config(None, ["eval.k=2"]), "/m", CodeTask(), problems, tmp_path,
                       ahead=[{"pass": "train", "problem_id": "p0", "answer": "a", "n": 1}])
    assert {k: metrics[k] for k in ("pass@1", "pass@2", "flagged_pass_share", "judged_by_value", "sandbox")} == {
        "pass@1": 0.5, "pass@2": 1.0, "flagged_pass_share": 0.5, "judged_by_value": 0.6, "sandbox": "bwrap"}


def test_run_eval_with_a_guide_scores_the_solver_and_counts_numbered_guidance_with_a_fake_pipeline(tmp_path,
                                                                                                   monkeypatch):
    """Driver logic only (a fake guide -> solver pipeline): one greedy guidance per problem from the guide pool,
    every solver pass answering it, nothing withheld; p0's guidance computes 17 (numbered), p1's quotes the
    question. The solver answers p0 right (greedy and both samples) and p1 wrong: pass@1 0.5, numbered 0.5."""
    import pyarrow as pa

    import selfimprove.rollout.guided
    from selfimprove.evaluate import run_eval
    from selfimprove.recipes import load_config
    from selfimprove.tasks import build_task

    seen = {}

    def fake_pipeline(task, rows, solver, guide, passes, seed, out, number_free=True):
        seen.update(rows=rows, solver=solver, guide=guide, passes=passes, number_free=number_free, out=out)
        guidance = {"p0": "Add 12 and 5 to get 17.", "p1": "Add the 5 to the 12."}
        return pa.Table.from_pylist([
            {"problem_id": r["problem_id"], "pass": name, "guidance_index": 0, "sample_index": i,
             "question": r["question"], "guidance": guidance[r["problem_id"]], "answer": r["answer"],
             "extracted": "17" if r["problem_id"] == "p0" else "3", "correct": r["problem_id"] == "p0"}
            for r in rows for name, (n, _) in passes.items() for i in range(n)])

    monkeypatch.setattr(selfimprove.rollout.guided, "guided_rollout", fake_pipeline)
    cfg = load_config(None, ["eval.k=2", "guide.max_tokens=99", "guide.num_actors=3"])
    task = build_task(cfg.task)
    problems = [{"id": f"p{i}", "question": "Ann has 12 pens and buys 5 more. How many?", "answer": "17",
                 "solution": ""} for i in range(2)]
    metrics = run_eval(cfg, "/solver", task, problems, tmp_path, name="s", guide="/guide")
    assert [(r["n"], r["temperature"]) for r in seen["rows"]] == [(1, 0.0), (1, 0.0)]
    assert seen["passes"] == {"greedy": (1, 0.0), "sample": (2, 0.8)} and seen["number_free"] is False
    assert (seen["solver"].model, seen["guide"].model, seen["guide"].cfg.max_tokens, seen["guide"].cfg.num_actors) == (
        "/solver", "/guide", 99, 3)
    assert {k: metrics[k] for k in ("model", "guide", "pass@1", "maj@2", "numbered_guidance")} == {
        "model": "s", "guide": "/guide", "pass@1": 0.5, "maj@2": 0.5, "numbered_guidance": 0.5}


def test_the_report_sets_are_the_task_test_split_then_each_extra_set_on_its_test_split(tmp_path, capsys):
    """eval.split val (the default): the report adds the task's test split as 'test', then eval.extra's sets, each
    on its test split; an eval.optional set whose data is not on this machine is left out with a note, and a
    set that is not optional fails on it."""
    from selfimprove.errors import UserError
    from selfimprove.evaluate import extra_sets
    from selfimprove.recipes import load_config
    from selfimprove.tasks import build_task

    missing = tmp_path / "absent"
    cfg = load_config(None, ["task.generated_test=20", "task.generated_val=10", "eval.extra.wide.min_value=16",
                             "eval.extra.wide.max_value=40", "eval.extra.wide.generated_test=5",
                             "eval.extra.gsm8k.name=gsm8k", f"eval.extra.gsm8k.data={missing}",
                             "eval.optional=[gsm8k]"])
    assert cfg.eval.split == "val"
    sets = extra_sets(cfg)
    assert list(sets) == ["test", "wide"]
    assert [p["id"] for p in sets["test"][1]] == [p["id"] for p in build_task(cfg.task).load("test")]
    assert len(sets["test"][1]) == 20 and len(sets["wide"][1]) == 5
    assert all(int(n) >= 16 for p in sets["wide"][1] for n in p["question"].split() if n.isdigit())
    assert capsys.readouterr().out == (f"eval.extra.gsm8k: {missing} is not on this machine; the set is left out "
                                       "(eval.optional)\n")
    assert list(extra_sets(load_config(None, ["eval.split=test", "task.generated_test=20"]))) == []
    assert list(extra_sets(load_config(None, ["eval.test=false", "task.generated_test=20"]))) == []
    with pytest.raises(UserError, match=f"dataset path not found: {missing}"):
        extra_sets(load_config(None, ["eval.extra.gsm8k.name=gsm8k", f"eval.extra.gsm8k.data={missing}"]))


@pytest.mark.parametrize("overrides, message", [
    (["eval.extra.test.min_value=16"], "eval.extra.test: 'test' names the task's own test split among the report's "
                                       "sets; call it otherwise"),
    (["eval.extra.wide.min_value=16", "eval.optional=[wide, gsm8k]"],
     "eval.optional names gsm8k, which eval.extra does not hold"),
])
def test_report_set_names_that_cannot_be_meant_are_refused(overrides, message):
    from selfimprove.errors import UserError
    from selfimprove.recipes import load_config

    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert str(e.value) == f"defaults: {message}"
