"""Self-Refine Instruction-Tuning without engines: its plan, its checks, its labels, its demonstrations file and
the question-only path's refusals. (`tests/test_run.py` runs it for real.)"""

import json
from pathlib import Path

import pytest

from selfimprove.errors import UserError
from selfimprove.labels import teacher_labels
from selfimprove.recipes import load_config, recipe
from selfimprove.recipes.stages import Model, Run, read_demonstrations
from selfimprove.tasks import build_task
from tests.test_recipes import GENERATE, TRAIN

TEACHER = ["recipe=self_refine", "models.teacher=/teacher"]


def plan(*overrides, teacher=Model("/teacher", "/teacher"), task=None, problems=(), reference=None):
    cfg = load_config(None, list(overrides))
    run = Run(cfg, Path("/r"), task, list(problems), [], Model("/student", "/student"), GENERATE, TRAIN,
              teacher=teacher, reference=reference)
    return recipe("self_refine").plan(run)


def test_it_evaluates_both_models_tunes_on_the_teachers_demonstrations_then_runs_its_rounds():
    stages = plan(*TEACHER, "iterations=2")
    assert [(s.iteration, s.kind) for s in stages] == [
        (0, "eval"), (0, "teacher_eval"), (1, "demos"), (1, "labels"), (1, "train"), (1, "eval"),
        (2, "rollout"), (2, "pairs"), (2, "train"), (2, "eval"), (3, "rollout"), (3, "pairs"), (3, "train"), (3, "eval")]
    reads = {(s.iteration, s.kind): s.reads for s in stages}
    assert reads[(0, "teacher_eval")]["model"] == reads[(1, "demos")]["model"] == "/teacher"
    assert reads[(1, "train")] == {"model": "/student", "pairs": Path("/r/iter_1/labels"), "subfolder": None, "loss": "sft",
                                   "reference": None}
    # Rounds sample the labelled questions, each from the last model, and train with train.loss (dpo).
    assert reads[(2, "rollout")]["problems"] == reads[(3, "rollout")]["problems"] == Path("/r/iter_1/labels")
    assert reads[(2, "pairs")]["problems"] == Path("/r/iter_1/labels")  # its gold chains: the teacher's
    assert [reads[(t, "rollout")]["model"] for t in (2, 3)] == [Path("/r/iter_1/train"), Path("/r/iter_2/train")]
    assert reads[(3, "train")] == {"model": Path("/r/iter_2/train"), "pairs": Path("/r/iter_3/pairs"),
                                   "subfolder": None, "loss": None,
                                   "reference": None}
    assert load_config(None, TEACHER).train.loss == "dpo"
    # The teacher samples teacher.n at teacher.temperature.
    assert (reads[(1, "demos")]["n"], reads[(1, "demos")]["temperature"]) == (4, 0.7)


def test_a_fixed_reference_is_read_by_the_preference_rounds_not_by_instruction_tuning():
    reads = {(s.iteration, s.kind): s.reads for s in plan(*TEACHER, "iterations=1", reference=Model("/ref", "/base"))}
    assert (reads[(1, "train")]["reference"], reads[(2, "train")]["reference"]) == (None, "/base")


def test_the_instruction_tuning_stage_passes_the_trainers_check_although_its_loss_is_not_the_recipes():
    import dataclasses

    from selfimprove.config import check_knobs
    from selfimprove.recipes import check

    cfg = load_config(None, TEACHER)
    tuning = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss="sft"))
    check_knobs(tuning)  # what the trainer checks: the knobs it reads
    with pytest.raises(UserError, match="recipe self_refine's rounds train outcome pairs"):
        check(tuning)


def test_demonstrations_from_a_file_are_read_when_planned_and_no_teacher_is_evaluated(tmp_path):
    task = build_task(load_config(None, ["task.generated_train=5"]).task)
    problems = task.load("train")
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"question": problems[0]["question"], "response": "The answer is 3."}) + "\n")
    stages = plan("recipe=self_refine", f"teacher.data={demos}", teacher=None, task=task, problems=problems)
    assert [(s.iteration, s.kind) for s in stages][:4] == [(0, "eval"), (1, "demos"), (1, "labels"), (1, "train")]


@pytest.mark.parametrize("overrides, message", [
    (["recipe=self_refine"], "recipe self_refine needs a teacher: set models.teacher (a model) or teacher.data"),
    ([*TEACHER, "teacher.data=/d.jsonl"], "recipe self_refine takes its demonstrations from models.teacher or from "
                                         "teacher.data: give one of them"),
    ([*TEACHER, "train.loss=sft"], "recipe self_refine's rounds train outcome pairs: it needs pairs.source=outcome "
                                   "and a preference train.loss (dpo, rpo, ipo or orpo), got pairs.source=outcome "
                                   "and train.loss=sft"),
    (["recipe=irpo", "models.teacher=/teacher"], "recipe irpo has no teacher: models.teacher and teacher.data are "
                                                 "read by recipes self_refine and sgft"),
    (["model=a", "models.policy=b"], "'model' ('a') and 'models.policy' ('b') name two policies; give one of them"),
    (["eval.extra.wide.max_valu=40"], "unknown key 'eval.extra.wide.max_valu'"),
    (["models.reference=/r", "train.loss=orpo"], "models.reference is a DPO reference, which train.loss=orpo does not use"),
])
def test_bad_roles_and_sets_fail_at_load(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_models_policy_is_the_model_and_an_extra_set_is_the_task_but_for_its_keys():
    cfg = load_config(None, ["models.policy=/p", "task.max_value=15", "eval.extra.wide.min_value=16",
                             "eval.extra.wide.max_value=40"])
    assert (cfg.model, cfg.models.policy) == ("/p", None)
    wide = cfg.eval.extra["wide"]
    assert (wide.name, wide.min_value, wide.max_value, wide.operations) == ("arithmetic", 16, 40, "+-")


def sample(pid, i, text, extracted, correct=False, status="ok"):
    return {"problem_id": pid, "sample_index": i, "text": text, "extracted": extracted, "correct": correct,
            "status": status}


def test_gold_answers_label_their_questions_and_keep_the_demonstrations_that_reach_them():
    problems = [{"id": "a", "question": "qa", "answer": "5", "solution": ""},
                {"id": "b", "question": "qb", "answer": "7", "solution": "gold b"}]
    samples = [sample("a", 1, "t1", "5", True), sample("a", 0, "t0", "4"), sample("a", 2, "t1", "5", True),
               sample("a", 3, "t3", "5", True), sample("b", 0, "u0", "6")]
    labelled, rows, stats = teacher_labels(problems, samples, rows_per_problem=3)
    # A question with no right demonstration keeps its gold label for the rounds; the first demonstration that
    # reaches the answer stands in for a missing gold chain of thought.
    assert labelled == [dict(problems[0], solution="t1"), problems[1]]
    assert rows == [{"problem_id": "a", "response": "t1"}, {"problem_id": "a", "response": "t3"}]
    assert stats == {"problems": 2, "gold_labels": 2, "majority_labels": 0, "no_answer": 0, "no_correct": 1,
                     "demonstration_accuracy": 0.6, "rows": 2}


def test_questions_without_answers_are_labelled_by_the_teachers_majority():
    problems = [{"id": "a", "question": "qa", "answer": ""}, {"id": "b", "question": "qb", "answer": ""},
                {"id": "c", "question": "qc", "answer": ""}]
    samples = [sample("a", 0, "x", "4"), sample("a", 1, "y", "5"), sample("a", 2, "z", "5"), sample("a", 3, "w", None),
               # a tie goes to the answer seen first; a skipped sample does not vote
               sample("b", 0, "p", "8"), sample("b", 1, "q", "9"), sample("b", 2, "", "9", status="skipped=too_long"),
               sample("c", 0, "no answer stated", None)]
    labelled, rows, stats = teacher_labels(problems, samples, rows_per_problem=2)
    assert [(p["id"], p["answer"], p["solution"]) for p in labelled] == [("a", "5", "y"), ("b", "8", "p")]
    assert rows == [{"problem_id": "a", "response": "y"}, {"problem_id": "a", "response": "z"},
                    {"problem_id": "b", "response": "p"}]
    assert stats == {"problems": 3, "gold_labels": 0, "majority_labels": 2, "no_answer": 1, "no_correct": 0,
                     "rows": 3}


def test_a_demonstrations_file_counts_each_dropped_row_by_reason(tmp_path):
    task = build_task(load_config(None).task)
    problems = [{"id": "p0", "question": "Tom has 2 apples. He buys 3 more apples. How many apples does he have?",
                 "answer": "5", "solution": ""}]
    rows = [{"question": problems[0]["question"], "response": "2 + 3 = 5. The answer is 5."},
            {"question": problems[0]["question"], "response": "The answer is 6."},
            {"question": "not a training question", "response": "The answer is 1."},
            {"question": problems[0]["question"]}, {"response": "The answer is 5."}]
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, stats = read_demonstrations(str(path), task, problems)
    assert [(s["sample_index"], s["extracted"], s["correct"]) for s in samples] == [(0, "5", True), (1, "6", False)]
    assert stats == {"rows": 5, "no_question": 1, "no_response": 1, "unknown_question": 1, "used": 2}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    with pytest.raises(UserError) as e:
        read_demonstrations(str(path), task, problems)
    assert str(e.value) == (f"{path}: no usable demonstrations among its 3 rows (1 no question, 1 no response, 1 "
                            "unknown question); each row needs a `question` that is one of the training problems' and "
                            "a `response`")


@pytest.fixture
def question_only(tmp_path):
    """A GSM8K-style folder whose training questions come without answers."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"question": f"What is {i} + 1?"}) + "\n" for i in range(4)))
    (folder / "test.jsonl").write_text(json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) + "\n")
    return folder


def test_a_question_only_task_file_is_refused_by_a_recipe_that_learns_from_gold(question_only, tmp_path):
    from selfimprove.driver import run

    cfg = load_config(None, ["recipe=irpo", "task.name=gsm8k", f"task.data={question_only}", f"run_dir={tmp_path / 'r'}",
                             "eval.split=test"])
    with pytest.raises(UserError) as e:
        run(cfg)
    assert str(e.value) == (f"task.data={question_only}: 4 of the 4 training problems have no answer, and recipe irpo "
                            "learns from gold answers; recipe self_refine labels questions by its teacher")
    assert not (tmp_path / "r").exists()
    (question_only / "test.jsonl").write_text(json.dumps({"question": "What is 2 + 2?"}) + "\n")
    with pytest.raises(UserError, match="1 of the 1 held-out problems have no answer"):
        run(load_config(None, [*TEACHER[:1], "models.teacher=smollm2-135m-instruct", "task.name=gsm8k",
                               f"task.data={question_only}", f"run_dir={tmp_path / 'r'}", "eval.split=test"]))


@pytest.mark.engine
@pytest.mark.slow  # a whole run with a teacher (4 min); its parts are the tests above
def test_a_question_only_run_labels_by_the_teachers_majority_tunes_then_refines(tmp_path):
    """A real tiny run from a demonstrations file (the teacher's samples, written by hand: a teacher model goes
    through the same rollout stage as any other): training questions without answers are labelled by the
    majority of the stated answers, the student is tuned on the demonstrations that state the label, then refined
    for a round against those labels."""
    import subprocess
    import sys

    import pyarrow.parquet as pq
    import yaml

    from selfimprove.io import read_table
    from tests.processes import TINY_RUN

    data = tmp_path / "data"
    data.mkdir()
    # Questions none of which the carved val split takes (`tasks.base.carved`): all six are training problems.
    numbers = ((23, 58, 17), (41, 36, 12), (17, 29, 8), (64, 15, 33), (38, 47, 21), (53, 19, 26))
    questions = [f"Ann has {a} pens. She buys {b} more and gives {c} away. How many pens does she have?"
                 for a, b, c in numbers]
    (data / "train.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    (data / "test.jsonl").write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"})
                                             + "\n" for a, b in ((3, 4), (12, 9))))
    # Per question: right twice in two wordings and wrong once (label: the right answer, two demonstrations); the
    # third question's answers tie (the first stated wins); the fourth states none (no label).
    demos = []
    for i, (q, (a, b, c)) in enumerate(zip(questions, numbers)):
        right = a + b - c
        stated = {2: [right + 1, right], 3: [None, None]}.get(i, [right, right + 1, right])
        demos += [{"question": q, "response": f"{a} + {b} - {c} is it, so the answer is {x}." if x is not None
                   else "I cannot tell."} for x in stated]
        if i not in (2, 3):
            demos.append({"question": q, "response": f"She has {a} + {b} - {c} = {right}. The answer is {right}."})
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))
    config = tmp_path / "self_refine.yaml"
    config.write_text(yaml.safe_dump({
        **TINY_RUN, "recipe": "self_refine", "task": {"name": "gsm8k", "data": str(data)},
        "teacher": {"data": str(tmp_path / "demos.jsonl"), "rows_per_problem": 2},
        "rollout": {**TINY_RUN["rollout"], "max_tokens": 128}}))
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "selfimprove", "run", str(config), f"run_dir={run_dir}"],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]

    problems = json.loads((run_dir / "iter_1" / "labels" / "problems.json").read_text())
    labels = {p["question"]: p["answer"] for p in problems}
    assert labels == {q: str(a + b - c + (i == 2)) for i, (q, (a, b, c)) in enumerate(zip(questions, numbers))
                      if i != 3}
    stats = json.loads((run_dir / "iter_1" / "labels" / "stats.json").read_text())
    assert stats == {"problems": 6, "gold_labels": 0, "majority_labels": 5, "no_answer": 1, "no_correct": 0,
                     "rows": 9}
    tuned_on = pq.read_table(run_dir / "iter_1" / "labels" / "sft.parquet").to_pylist()
    expected = []
    for i, (a, b, c) in enumerate(numbers):
        right = a + b - c
        if i == 2:
            expected.append(f"{a} + {b} - {c} is it, so the answer is {right + 1}.")
        elif i != 3:  # the repeated wording once, then the other
            expected += [f"{a} + {b} - {c} is it, so the answer is {right}.",
                         f"She has {a} + {b} - {c} = {right}. The answer is {right}."]
    assert [r["response"] for r in tuned_on] == expected
    label_of = {p["id"]: p["answer"] for p in problems}
    # The round sampled the labelled questions only, judged against their labels.
    round_samples = read_table(run_dir / "iter_2" / "rollout" / "samples").to_pylist()
    assert {s["problem_id"] for s in round_samples} == set(label_of)
    assert all(s["correct"] for s in round_samples if s["extracted"] == label_of[s["problem_id"]])
    assert not any(s["correct"] for s in round_samples if s["extracted"] is None)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2] and "teacher_eval" not in rows[0]
    assert rows[1]["labels"] == stats
    assert rows[2]["pairs"]["no_winner"] == 0  # each labelled question's first demonstration is a winner
