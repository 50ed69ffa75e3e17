"""Driver bookkeeping without engines: run-dir claims, stage markers, metrics rows.

The stage functions here are stand-ins (named `fake_*`): these tests are about the driver's
order and skipping logic only; tests/test_run.py runs the real stages.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from selfimprove.cli import main
from selfimprove.driver import LOCK, Redo, _stage, claim_run_dir, run, write_metrics
from selfimprove.errors import UserError
from selfimprove.evaluate import write_report
from selfimprove.io import MARKER, SUCCESS, _bytes_digest, digest, is_done, success_record
from selfimprove.precision import Machine
from selfimprove.recipes import load_config
from selfimprove.recipes.stages import _pairs
from selfimprove.rollout.stage import SAMPLE_SCHEMA

ROOT = Path(__file__).resolve().parents[1]


def test_claim_saves_config_and_accepts_the_same(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'r'}"])
    with claim_run_dir(tmp_path / "r", cfg):
        assert (tmp_path / "r" / "config.yaml").is_file()
    with claim_run_dir(tmp_path / "r", load_config(None, [f"run_dir={tmp_path / 'r'}"])):
        pass


def test_claim_refuses_another_config(tmp_path):
    with claim_run_dir(tmp_path / "r", load_config(None, [f"run_dir={tmp_path / 'r'}"])):
        pass
    other = load_config(None, [f"run_dir={tmp_path / 'r'}", "rollout.n=4"])
    with pytest.raises(UserError, match=r"holds a run made with another config \(rollout.n: 8 then, 4 now\)"):
        claim_run_dir(tmp_path / "r", other)


def test_claim_with_more_iterations_continues_the_run(tmp_path):
    run_dir = tmp_path / "r"
    with claim_run_dir(run_dir, load_config(None, [f"run_dir={run_dir}", "iterations=2"])):
        pass
    with claim_run_dir(run_dir, load_config(None, [f"run_dir={run_dir}", "iterations=4"])):
        pass
    assert load_config(run_dir / "config.yaml").iterations == 4
    with pytest.raises(UserError, match=r"another config \(rollout.n: 8 then, 4 now\)"):
        claim_run_dir(run_dir, load_config(None, [f"run_dir={run_dir}", "iterations=5", "rollout.n=4"]))
    assert load_config(run_dir / "config.yaml").iterations == 4


def test_claim_with_another_storage_path_continues_the_run(tmp_path):
    """Where nodes share files changes no stage: a run resumed on another cluster, or another bucket, goes on."""
    run_dir = tmp_path / "r"
    with claim_run_dir(run_dir, load_config(None, [f"run_dir={run_dir}"])):
        pass
    with claim_run_dir(run_dir, load_config(None, [f"run_dir={run_dir}", "storage_path=s3://bucket/run"])):
        pass
    assert load_config(run_dir / "config.yaml").storage_path == "s3://bucket/run"


def test_claim_unwritable_path_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write the run dir .*file/r"):
        claim_run_dir(tmp_path / "file" / "r", load_config())


def test_claim_refuses_a_folder_that_is_not_a_run_and_writes_nothing_into_it(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "config.yaml").write_text("learning_rate: 3\n")  # a config, but not one of ours
    with pytest.raises(UserError) as e:
        claim_run_dir(run_dir, load_config(None, [f"run_dir={run_dir}"]))
    assert str(e.value) == f"{run_dir} is not empty and holds no selfimprove run; pass a new or empty run_dir=..."
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "notes.txt"]
    assert (run_dir / "notes.txt").read_text() == "mine" and (run_dir / "config.yaml").read_text() == "learning_rate: 3\n"


def test_claim_accepts_an_empty_folder_and_a_run_made_before_the_marker(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    cfg = load_config(None, [f"run_dir={run_dir}"])
    with claim_run_dir(run_dir, cfg):
        pass
    (run_dir / MARKER).unlink()  # as a run made before the marker existed: only its config.yaml says it is a run
    with claim_run_dir(run_dir, cfg):
        assert (run_dir / MARKER).is_file()


# Claims a run dir (argv[1], config argv[2]) as `selfimprove run` does, says so, and holds it until killed.
HOLD_RUN_DIR = """
import sys, time
from pathlib import Path
from selfimprove.recipes import load_config
from selfimprove.driver import claim_run_dir
lock = claim_run_dir(Path(sys.argv[1]), load_config(sys.argv[2], ["run_dir=" + sys.argv[1]]))
print("claimed", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_a_locked_run_dir_is_refused_naming_the_holder(tmp_path, capsys, monkeypatch):
    """Another process holds the run dir (it claimed it and sleeps): `selfimprove run` there is refused naming
    it. Once that process is killed, the OS has released its lock and the run dir can be claimed again."""
    import selfimprove.models
    import selfimprove.runtime

    def started(*args):
        raise AssertionError("the run started")

    monkeypatch.setattr(selfimprove.models, "resolve_model", lambda ref: "/start")  # checked before the claim
    monkeypatch.setattr(selfimprove.runtime, "init_ray", started)
    run_dir, config = tmp_path / "r", tmp_path / "config.yaml"
    config.write_text("iterations: 1\n")
    with subprocess.Popen([sys.executable, "-c", HOLD_RUN_DIR, str(run_dir), str(config)], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline() == "claimed\n"
            assert main(["run", str(config), f"run_dir={run_dir}"]) == 2
            assert capsys.readouterr().err == (
                f"selfimprove: error: {run_dir} is in use by another selfimprove run (pid {holder.pid} on "
                f"{socket.gethostname()}); wait for it to end, or pass another run_dir=...\n")
        finally:
            holder.kill()
    with claim_run_dir(run_dir, load_config(config, [f"run_dir={run_dir}"])):
        assert (run_dir / LOCK).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"


def test_a_lock_file_that_is_a_symlink_is_not_followed(tmp_path):
    run_dir = tmp_path / "r"
    with claim_run_dir(run_dir, load_config(None, [f"run_dir={run_dir}"])):
        pass
    (tmp_path / "elsewhere").write_text("not yours to truncate")
    (run_dir / LOCK).unlink()
    (run_dir / LOCK).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError) as e:
        claim_run_dir(run_dir, load_config(None, [f"run_dir={run_dir}"]))
    assert str(e.value) == f"cannot write the run dir {run_dir}: Too many levels of symbolic links"
    assert (tmp_path / "elsewhere").read_text() == "not yours to truncate"


def _flock_once_after(monkeypatch, before):
    """fcntl.flock as it is, but `before()` runs first on its first call: what another process does between a
    claim's opening of the lock file and its locking."""
    import fcntl

    real, calls = fcntl.flock, []

    def flock(f, op):
        if not calls:
            calls.append(op)
            before()
        return real(f, op)

    monkeypatch.setattr(fcntl, "flock", flock)


def test_a_claim_refused_by_a_run_that_locked_first_leaves_that_runs_lock(tmp_path, monkeypatch):
    """Two claims of a new run dir: the second finds no lock file, then the first (another process) makes and locks
    it before the second locks. The second is refused; the first's lock file stays, so a third claim is refused too."""
    run_dir, config = tmp_path / "r", tmp_path / "config.yaml"
    config.write_text("iterations: 1\n")
    cfg = load_config(config, [f"run_dir={run_dir}"])
    first = []

    def first_claims():
        first.append(subprocess.Popen([sys.executable, "-c", HOLD_RUN_DIR, str(run_dir), str(config)], cwd=ROOT,
                                      stdout=subprocess.PIPE, text=True))
        assert first[0].stdout.readline() == "claimed\n"

    _flock_once_after(monkeypatch, first_claims)
    try:
        for _ in ("second", "third"):
            with pytest.raises(UserError) as e:
                claim_run_dir(run_dir, cfg)
            assert str(e.value).startswith(f"{run_dir} is in use by another selfimprove run (pid {first[0].pid} on "
                                           f"{socket.gethostname()})")
        assert (run_dir / LOCK).read_text() == f"pid {first[0].pid} on {socket.gethostname()}\n"
    finally:
        for p in first:
            p.kill()
            p.wait()


def test_a_claim_whose_lock_file_was_removed_before_it_locked_locks_the_new_one(tmp_path, monkeypatch):
    """A failed claim removes the lock file it made while holding it. A claim that had opened that file locks a file
    no longer in the folder: it must open and lock the one there instead, or another run could lock that one too."""
    run_dir = tmp_path / "r"
    cfg = load_config(None, [f"run_dir={run_dir}"])
    with claim_run_dir(run_dir, cfg):
        pass
    _flock_once_after(monkeypatch, lambda: (run_dir / LOCK).unlink())
    with claim_run_dir(run_dir, cfg) as lock:
        mine, there = os.fstat(lock.fileno()), os.stat(run_dir / LOCK)
        assert (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)
        assert (run_dir / LOCK).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"


def test_run_dir_with_a_tilde_is_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["run_dir=~/runs/r", "storage_path=~/ray"])
    assert (cfg.run_dir, cfg.storage_path) == (str(tmp_path / "runs" / "r"), str(tmp_path / "ray"))
    with claim_run_dir(Path(cfg.run_dir), cfg):
        assert (tmp_path / "runs" / "r" / "config.yaml").is_file()


def test_finished_stage_is_skipped_and_failed_stage_leaves_nothing(tmp_path):
    calls = []

    def fake_stage(value, out):
        calls.append(value)
        (out / "result.txt").write_text(value)

    _stage(tmp_path / "s", fake_stage, "first")
    _stage(tmp_path / "s", fake_stage, "second")
    assert calls == ["first"] and (tmp_path / "s" / "result.txt").read_text() == "first"
    assert json.loads((tmp_path / "s" / "timing.json").read_text())["seconds"] >= 0

    def fake_failing_stage(out):
        (out / "half.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        _stage(tmp_path / "t", fake_failing_stage)
    assert not (tmp_path / "t").exists() and not is_done(tmp_path / "t")


def test_a_finished_stage_whose_inputs_changed_is_refused_or_redone_with_what_reads_it(tmp_path):
    """Two stand-in stages, `a` reading data, `b` reading `a`. Same data: both skipped. Other data: `a` refused,
    naming the input, and nothing rerun; with redo=a: `a` and then `b` (whose input `a` changed) run again."""
    ran = []

    def fake_stage(name, out):
        ran.append(name)

    def both(data, redo=None):
        _stage(tmp_path / "a", fake_stage, "a", inputs={"data": data}, redo=redo)
        _stage(tmp_path / "b", fake_stage, "b", inputs={"a": tmp_path / "a", "data": data}, redo=redo)

    both([1, 2])
    both([1, 2])
    assert ran == ["a", "b"]
    with pytest.raises(UserError, match=rf"^{tmp_path / 'a'} was made from other inputs than now \(data changed\); "
                                        r"rerun with --redo a to redo it and the stages after it, or pass a new run_dir"):
        both([1, 3])
    assert ran == ["a", "b"]
    both([1, 3], Redo(frozenset({"a"})))
    assert ran == ["a", "b", "a", "b"]
    both([1, 3])
    assert ran == ["a", "b", "a", "b"] and set(success_record(tmp_path / "b")) == {"inputs", "started"}


def test_a_model_folder_is_an_input_by_its_bytes(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"1234")
    before = digest(model)
    (model / "weights.bin").write_bytes(b"1235")
    _bytes_digest.cache_clear()  # written within the file system's clock tick: same size and mtime
    assert digest(model) != before and digest([1, 2]) != digest([2, 1]) and len(before) == 16


def test_disk_full_is_one_line_and_leaves_no_marker(tmp_path):
    def fake_disk_full_stage(out):
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match=r"cannot write stage .*s: No space left on device; rerun to redo only this stage"):
        _stage(tmp_path / "s", fake_disk_full_stage)
    assert not is_done(tmp_path / "s")


@pytest.mark.parametrize("cut", [0, 20], ids=["empty", "cut-short"])
def test_a_stage_whose_marker_is_empty_or_cut_short_is_redone_saying_so_in_one_line(tmp_path, capsys, cut):
    """The rerun finds the train stage's `_SUCCESS` empty, or cut after 20 bytes: it runs the stage again, says so in
    one line, and the stage that reads it runs again too."""
    from selfimprove.progress import RunProgress

    train, evaluate = tmp_path / "iter_1" / "train", tmp_path / "iter_1" / "eval"
    ran = []

    def both():
        progress = RunProgress(tmp_path, [(1, "train"), (1, "eval")])
        _stage(train, lambda out: ran.append("train"), progress=progress, inputs={"data": [1, 2]}, redo=redo)
        _stage(evaluate, lambda out: ran.append("eval"), progress=progress, inputs={"model": train}, redo=redo)

    redo = Redo()
    both()
    record = (train / SUCCESS).read_bytes()
    (train / SUCCESS).write_bytes(record[:cut])
    capsys.readouterr()
    redo = Redo()
    both()
    assert ran == ["train", "eval", "train", "eval"]
    said = [line for line in capsys.readouterr().err.splitlines() if SUCCESS in line]
    assert said == [f"iteration 1 train: its _SUCCESS marker ({train}) is empty or cut short, so it may not have "
                    "finished: running it again"]
    assert set(success_record(train)) == {"inputs", "started"}


def test_metrics_rows_from_finished_eval_stages(tmp_path):
    def fake_eval(metrics, out):
        (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "problems": []}))

    _stage(tmp_path / "iter_0" / "eval", fake_eval, {"pass@1": 0.2})
    _stage(tmp_path / "iter_1" / "process", lambda out: (out / "stats.json").write_text('{"steps": 9}'))
    _stage(tmp_path / "iter_1" / "pairs", lambda out: (out / "stats.json").write_text('{"pairs": 7}'))
    _stage(tmp_path / "iter_1" / "eval", fake_eval, {"pass@1": 0.3})
    # Its engines' start-up records: a pool of two (first began at 100, last ready at 142) and a further
    # held-out set's pool of one (10 s).
    for folder, name, began, ready in [("engines", "a", 100, 130), ("engines", "b", 101, 142),
                                       ("extra/wide/engines", "c", 200, 210)]:
        (tmp_path / "iter_1" / "eval" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "iter_1" / "eval" / folder / f"{name}.json").write_text(json.dumps({"began": began, "ready": ready}))
    (tmp_path / "iter_2" / "rollout").mkdir(parents=True)  # unfinished iteration: no row
    rows = write_metrics(tmp_path)
    assert [(r["iteration"], r["pass@1"], r.get("pairs")) for r in rows] == [(0, 0.2, None), (1, 0.3, {"pairs": 7})]
    assert rows[1]["process"] == {"steps": 9} and "process" not in rows[0]
    assert set(rows[1]["stage_seconds"]) == {"process", "pairs", "eval"}
    assert rows[1]["fixed_seconds"] == {"eval": 52.0} and rows[0]["fixed_seconds"] == {}
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows


def test_report_from_metrics(tmp_path):
    rows = [{"iteration": 0, "model": "m", "task": "arithmetic", "split": "test", "problems": 10, "pass@1": 0.2,
             "maj@4": 0.1, "stage_seconds": {"eval": 5.0}},
            {"iteration": 1, "model": "m", "task": "arithmetic", "split": "test", "problems": 10, "pass@1": 0.4,
             "maj@4": 0.3, "pairs": {"pairs": 12, "no_winner": 3, "no_loser": 1, "problems": 9},
             "stage_seconds": {"rollout": 10.0, "pairs": 1.0, "train": 20.0, "eval": 5.0},
             "fixed_seconds": {"rollout": 4.0, "train": 8.0}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path)
    assert report.read_text().splitlines()[4:8] == [
        "| iteration | pass@1 | maj@4 | training rows | problems dropped | seconds | fixed cost |",
        "|---|---|---|---|---|---|---|",
        "| 0 | 0.200 | 0.100 |  |  | 5 |  |",
        "| 1 | 0.400 | 0.300 | 12 | no winner 3, no loser 1 | 36 | 40% |"]  # (4 + 8) / (10 + 20)
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_pass_at_1_with_its_interval_where_the_eval_computed_one(tmp_path):
    rows = [{"iteration": 0, "model": "m", "task": "arithmetic", "split": "test", "problems": 10, "pass@1": 0.4,
             "pass_at_1_interval": [0.1, 0.7], "maj@4": 0.3, "stage_seconds": {"eval": 5.0}}]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert write_report(tmp_path).read_text().splitlines()[6] == "| 0 | 0.400 [0.100, 0.700] | 0.300 |  |  | 5 |  |"


def test_report_shows_the_extra_sets_and_the_teacher_beside_the_task(tmp_path):
    head = {"model": "m", "task": "arithmetic", "split": "val", "problems": 10}
    test = {"pass@1": 0.25, "pass_at_1_interval": [0.0, 0.5]}  # greedy alone (eval.extra_k 1): no maj@4 column
    rows = [{"iteration": 0, **head, "pass@1": 0.2, "maj@4": 0.1,
             "extra": {"test": test, "wide": {"pass@1": 0.05, "maj@4": 0.0}},
             "teacher_eval": {**head, "model": "t", "pass@1": 0.5, "maj@4": 0.4,
                              "extra": {"wide": {"pass@1": 0.3, "maj@4": 0.2}}},
             "stage_seconds": {"eval": 5.0, "teacher_eval": 6.0}},
            {"iteration": 1, **head, "pass@1": 0.4, "maj@4": 0.3,
             "extra": {"test": test, "wide": {"pass@1": 0.1, "maj@4": 0.15}},
             "labels": {"problems": 9, "gold_labels": 9, "majority_labels": 0, "no_answer": 0, "no_correct": 2,
                        "demonstration_accuracy": 0.5, "rows": 7},
             "stage_seconds": {"demos": 3.0, "labels": 1.0, "train": 20.0, "eval": 5.0}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert write_report(tmp_path).read_text().splitlines()[6:] == [
        "| 0 | 0.200 | 0.100 |  |  | 11 |  |",
        "| 1 | 0.400 | 0.300 | 7 | no answer 0, no correct 2 | 29 |  |",
        "",
        "Fixed cost: engines starting, Ray Train and DeepSpeed setting up, the reference pass and saving, as a share "
        "of the seconds of the stages that recorded it; per stage in `metrics.jsonl` (`fixed_seconds`).",
        "",
        "The report's sets, beside the val split above: the task's test split (`test`; nothing chooses on it) and "
        "each `eval.extra` set's:",
        "",
        "| iteration | test pass@1 | wide pass@1 | wide maj@4 |",
        "|---|---|---|---|",
        "| 0 | 0.250 [0.000, 0.500] | 0.050 | 0.000 |",
        "| 1 | 0.250 [0.000, 0.500] | 0.100 | 0.150 |",
        "",
        "Other models, same held-out sets:",
        "",
        "- iteration 0 `teacher_eval`, `t`: pass@1 0.500, maj@4 0.400; wide: pass@1 0.300, maj@4 0.200"]


def test_report_has_a_step_scoring_table_when_steps_were_scored(tmp_path):
    """Iteration 1 scored by simulation, iteration 2 by a trained PRM: their figures differ, so the columns are
    the union in first-seen order and a figure an iteration lacks is blank."""
    common = {"model": "m", "task": "arithmetic", "split": "test", "problems": 10, "pass@1": 0.2}
    rows = [{"iteration": 0, **common, "stage_seconds": {"eval": 5.0}},
            {"iteration": 1, **common, "process": {"samples": 8, "steps": 20, "rollouts": 31},
             "stage_seconds": {"process": 40.4, "eval": 5.0}},
            {"iteration": 2, **common, "process": {"samples": 8, "steps": 19, "predicted": 8},
             "stage_seconds": {"process": 3.0}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = write_report(tmp_path).read_text().splitlines()
    assert lines[lines.index("Step scoring (process supervision):") + 2:] == [
        "| iteration | samples | steps | rollouts | predicted | seconds |",
        "|---|---|---|---|---|---|",
        "| 1 | 8 | 20 | 31 |  | 40 |",
        "| 2 | 8 | 19 |  | 8 | 3 |"]


def test_report_of_a_code_run_shows_the_flagged_share_of_passes_of_the_eval_and_its_rollout(tmp_path):
    """Iteration 0: 1 of 8 held-out passes flagged; iteration 1: none of the eval's, 3 of its rollout's 30; a row
    without the figure (written before the monitor) leaves the cell blank."""
    head = {"model": "m", "task": "functions", "split": "test", "problems": 10}
    rows = [{"iteration": 0, **head, "pass@1": 0.2, "pass@4": 0.5, "flagged_pass_share": 0.125,
             "stage_seconds": {"eval": 5.0}},
            {"iteration": 1, **head, "pass@1": 0.4, "pass@4": 0.6, "flagged_pass_share": 0.0,
             "rollout": {"drawn_by": "iter_0/eval", "samples": 80, "passed": 30, "flagged_passes": 3,
                         "flagged_pass_share": 0.1, "judged": {"value": 70, "in_process": 5}},
             "pairs": {"pairs": 12, "no_winner": 3, "problems": 9}, "stage_seconds": {"train": 20.0, "eval": 5.0}},
            {"iteration": 2, **head, "pass@1": 0.4, "pass@4": 0.6, "stage_seconds": {}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = write_report(tmp_path).read_text().splitlines()
    assert lines[4:9] == [
        "| iteration | pass@1 | pass@4 | flagged passes | training rows | problems dropped | seconds | fixed cost |",
        "|---|---|---|---|---|---|---|---|",
        "| 0 | 0.200 | 0.500 | 12.5% |  |  | 5 |  |",
        "| 1 | 0.400 | 0.600 | 0.0% (rollout 10.0%) | 12 | no winner 3 | 25 |  |",
        "| 2 | 0.400 | 0.600 |  |  |  | 0 |  |"]
    assert lines[-1].startswith("Flagged passes: of the held-out samples that pass")


def _judged_sample(pass_name, pid, i, correct, flags, judged):
    return {name: None for name in SAMPLE_SCHEMA.names} | {
        "pass": pass_name, "problem_id": pid, "sample_index": i, "n": 2, "text": "", "status": "ok",
        "correct": correct, "flags": flags, "judged": judged}


def test_a_code_rollout_counts_its_flagged_passes_in_stats_json_beside_where_it_was_drawn(tmp_path, monkeypatch):
    """Samples drawn ahead by iteration 0's eval: 2 passes of 4, one flagged (share 0.5), 3 programs run, 1 by value.
    Drawn by its own engines (a stand-in rollout), the same samples give the same counts without `drawn_by`; an
    answer-matching task's rollout writes no stats.json of its own."""
    import selfimprove.rollout.stage
    from selfimprove.recipes.stages import _rollout
    from selfimprove.rollout.stage import ahead_record, request_rows
    from selfimprove.tasks import build_task

    task = build_task(load_config(None, ["task.name=functions", "task.generated_train=5"]).task)
    problems = task.load("train")[:2]
    requests = request_rows(task, problems, {"train": (2, 0.8)}, seed=0)
    p, q = (r["id"] for r in problems)
    samples = [_judged_sample("train", p, 0, True, ["frame"], "in_process"),
               _judged_sample("train", p, 1, False, ["exit"], "in_process"),
               _judged_sample("train", q, 0, True, [], "value"), _judged_sample("train", q, 1, False, [], None)]
    eval_dir = tmp_path / "iter_0" / "eval"
    (eval_dir / "samples").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(samples, schema=SAMPLE_SCHEMA), eval_dir / "samples" / "part.parquet")
    (eval_dir / SUCCESS).write_text("{}")
    (eval_dir / "ahead.json").write_text(ahead_record("model-a", requests))
    engines = []  # the stand-in's calls: a rollout that finds its samples drawn starts none

    def fake_rollout(model, cfg, task, rows, out):
        engines.append(model)
        return pa.Table.from_pylist(samples, schema=SAMPLE_SCHEMA)

    monkeypatch.setattr(selfimprove.rollout.stage, "rollout", fake_rollout)
    counts = {"samples": 4, "passed": 2, "flagged_passes": 1, "flagged_pass_share": 0.5,
              "judged": {"value": 1, "in_process": 2}}
    cfg = load_config()
    drawn = tmp_path / "iter_1" / "rollout"
    drawn.mkdir(parents=True)
    _rollout(cfg, "model-a", task, lambda: requests, eval_dir, drawn)
    assert json.loads((drawn / "stats.json").read_text()) == {"drawn_by": "iter_0/eval", **counts} and not engines
    fresh = tmp_path / "iter_1" / "fresh"
    fresh.mkdir()
    _rollout(cfg, "model-b", task, lambda: requests, eval_dir, fresh)
    assert json.loads((fresh / "stats.json").read_text()) == counts and engines == ["model-b"]
    answers = tmp_path / "iter_1" / "answers"
    answers.mkdir()
    _rollout(cfg, "model-b", build_task(cfg.task), lambda: requests, None, answers)
    assert not (answers / "stats.json").exists()


def test_report_without_metrics(tmp_path):
    with pytest.raises(UserError, match="has no metrics.jsonl"):
        write_report(tmp_path)


def test_claim_accepts_a_run_saved_before_a_key_existed(tmp_path):
    """A run dir from an older version lacks the `process` section; at its defaults it is the same config."""
    cfg = load_config(None, [f"run_dir={tmp_path / 'r'}"])
    with claim_run_dir(tmp_path / "r", cfg):
        pass
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    del saved["process"]
    (tmp_path / "r" / "config.yaml").write_text(yaml.safe_dump(saved))
    with claim_run_dir(tmp_path / "r", cfg):
        pass
    with pytest.raises(UserError, match=r"process.k: 4 then, 2 now"):
        claim_run_dir(tmp_path / "r", load_config(None, [f"run_dir={tmp_path / 'r'}", "process.k=2"]))


def _sample(pid, i, text, correct):
    return {"problem_id": pid, "sample_index": i, "prompt_text": f"P-{pid}", "text": text, "status": "ok",
            "correct": correct}


def _iteration(root, t, samples, steps=None):
    """An iteration folder with a finished rollout (and process) stage holding these rows."""
    it = root / f"iter_{t}"
    (it / "rollout" / "samples").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(samples), it / "rollout" / "samples" / "part.parquet")
    if steps is not None:
        (it / "process").mkdir()
        pq.write_table(pa.Table.from_pylist(steps), it / "process" / "steps.parquet")
    return it


SAMPLES = [_sample("p", 0, "right", True), _sample("p", 1, "wrong", False), _sample("q", 0, "q-right", True)]


@pytest.mark.parametrize("loss, name, rows", [
    ("rpo", "pairs.parquet", [("P-p", "right", "wrong")]),
    ("sft", "sft.parquet", [("P-p", "right"), ("P-q", "q-right")]),
])
def test_pairs_stage_writes_pairs_or_sft_rows_by_loss(tmp_path, loss, name, rows):
    it = _iteration(tmp_path, 1, SAMPLES)
    cfg = load_config(None, [f"train.loss={loss}"])
    _stage(it / "pairs", _pairs, cfg, [], it, None)
    table = pq.read_table(it / "pairs" / name)
    assert [tuple(r[c] for c in table.column_names if c != "problem_id") for r in table.to_pylist()] == rows


def test_process_pairs_need_the_score_gap_and_accumulate(tmp_path):
    """Scores: p/0 mean(1, 0.5) = 0.75, p/1 mean(0.5, 0) = 0.25, q/0 = 1, q/1 = 0.95: only p's gap 0.5 >= eta 0.2."""
    steps = [{"problem_id": pid, "sample_index": i, "value": v}
             for pid, i, vs in (("p", 0, (1, 0.5)), ("p", 1, (0.5, 0)), ("q", 0, (1,)), ("q", 1, (0.95,))) for v in vs]
    samples = [*SAMPLES, _sample("q", 1, "q-almost", False)]
    cfg = load_config(None, ["pairs.source=process", "process.eta=0.2", "pairs.accumulate=true"])
    first = _iteration(tmp_path, 1, samples, steps)
    _stage(first / "pairs", _pairs, cfg, [], first, None)
    assert [(r["chosen"], r["rejected"], r["chosen_score"]) for r in pq.read_table(first / "pairs" / "pairs.parquet").to_pylist()] == [
        ("right", "wrong", 0.75)]
    # Iteration 2 finds the same pair again and a new one for q: D_2 = D_1 + new, no repeats.
    steps2 = [{**s, "value": 0.0} if (s["problem_id"], s["sample_index"]) == ("q", 1) else s for s in steps]
    second = _iteration(tmp_path, 2, samples, steps2)
    _stage(second / "pairs", _pairs, cfg, [], second, first / "pairs")
    assert [(r["chosen"], r["rejected"]) for r in pq.read_table(second / "pairs" / "pairs.parquet").to_pylist()] == [
        ("right", "wrong"), ("q-right", "q-almost")]
    assert json.loads((second / "pairs" / "stats.json").read_text())["accumulated"] == 2


def test_no_training_rows_stops_saying_why_and_what_to_change(tmp_path):
    it = _iteration(tmp_path, 1, [_sample("p", 0, "a", False), _sample("p", 1, "b", False)])
    with pytest.raises(UserError, match=r"nothing to train on .*of 1 problems, 1 had no correct sample and 0 no "
                                        r"incorrect one; raise rollout.n .*pairs.include_gold=true"):
        _stage(it / "pairs", _pairs, load_config(), [], it, None)
    assert not is_done(it / "pairs")


def test_trained_scorer_wiring_with_fake_scorers_and_stages(tmp_path, monkeypatch):
    """Three iterations, process.prm_mc_iterations=2. The scorers, the PRM trainer and the rollout, train and
    eval stages are stand-ins that log their calls; the driver's own `_process` and `_pairs` run. Expected:
    MC scores iterations 1 and 2 with the policy that sampled them; after iteration 2's process stage the PRM
    is trained on iterations 1 and 2 from the starting model; iteration 3 is scored by that PRM. A rerun
    does nothing; with iteration 3's process stage gone, it is redone and so are the stages that read it;
    `redo=("prm",)` redoes the PRM and what reads it."""
    import selfimprove.models
    import selfimprove.precision
    import selfimprove.recipes.stages as stages
    import selfimprove.reward.mc_prm
    import selfimprove.reward.trained_prm
    import selfimprove.runtime

    log = []
    steps = [{"problem_id": "p", "sample_index": 0, "step_index": 0, "value": 1.0},
             {"problem_id": "p", "sample_index": 1, "step_index": 0, "value": 0.0}]

    def fake_rollout(cfg, policy, task, requests, drawn_in, out):
        log.append(("rollout", out.parent.name, policy))
        (out / "samples").mkdir()
        pq.write_table(pa.Table.from_pylist([_sample("p", 0, "good", True), _sample("p", 1, "bad", False)]),
                       out / "samples" / "part.parquet")

    def fake_scorer(name):
        def score(model, *args):
            out = args[-1]
            log.append((name, out.parent.name, str(model)))
            pq.write_table(pa.Table.from_pylist(steps), out / "steps.parquet")
            (out / "stats.json").write_text(json.dumps({"scored_by": name}))
        return score

    def fake_train_prm(cfg, backbone, iterations, out, checkpoints):
        assert checkpoints == out.parent.with_name("prm.ray")  # outside the scratch folder a rerun clears
        log.append(("train_prm", out.parent.parent.name, backbone, [p.name for p in iterations]))
        out.mkdir()

    def fake_train(cfg, policy, pairs_dir, reference, out):
        log.append(("train", out.parent.name, len(pq.read_table(pairs_dir / "pairs.parquet"))))
        (out / "model").mkdir()

    def fake_eval(cfg, policy, name, task, problems, extra, guide, ahead, out):
        (out / "metrics.json").write_text(json.dumps({"metrics": {"pass@1": 0.5}}))

    monkeypatch.setattr(selfimprove.models, "resolve_model", lambda ref: "/start")
    monkeypatch.setattr(selfimprove.runtime, "init_ray", lambda: None)
    monkeypatch.setattr(stages, "_rollout", fake_rollout)
    monkeypatch.setattr(stages, "_train", fake_train)
    monkeypatch.setattr(stages, "_evaluate", fake_eval)
    monkeypatch.setattr(selfimprove.reward.mc_prm, "run_mc_prm", fake_scorer("mc"))
    monkeypatch.setattr(selfimprove.reward.trained_prm, "run_trained_prm", fake_scorer("trained"))
    monkeypatch.setattr(selfimprove.reward.trained_prm, "train_prm", fake_train_prm)
    monkeypatch.setattr(selfimprove.precision, "engine_machine", lambda: Machine("cpu", frozenset({"avx2"})))
    run_dir = tmp_path / "r"
    cfg = load_config(None, ["pairs.source=process", "train.loss=orpo", "process.scorer=trained", "iterations=3",
                             "process.prm_mc_iterations=2", f"run_dir={run_dir}", "task.generated_train=10",
                             "task.generated_test=10"])
    rows = run(cfg)
    assert [r.get("process") for r in rows] == [None, {"scored_by": "mc"}, {"scored_by": "mc"},
                                                {"scored_by": "trained"}]
    # auto on a CPU without bf16: every stage that computes with a model records float32, the PRM scorer none
    generated = {"rollout": "float32", "process": "float32", "eval": "float32"}
    assert [r["stage_dtype"] for r in rows] == [
        {"eval": "float32"}, {**generated, "train": "fp32"}, {**generated, "prm": "fp32", "train": "fp32"},
        {"rollout": "float32", "train": "fp32", "eval": "float32"}]
    assert json.loads((run_dir / "iter_1" / "train" / "dtype.json").read_text()) == {
        "key": "train.precision", "value": "fp32", "warning": None,
        "reason": "auto: this CPU has no avx512_bf16 / amx_bf16 / bf16: bfloat16 is emulated"}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["precision"] == "auto"
    model = {t: str((run_dir / f"iter_{t}" / "train" / "model").resolve()) for t in (1, 2)}
    prm = str((run_dir / "iter_2" / "prm" / "model").resolve())
    assert [entry for entry in log if entry[0] != "rollout"] == [
        ("mc", "iter_1", "/start"), ("train", "iter_1", 1),
        ("mc", "iter_2", model[1]), ("train_prm", "iter_2", "/start", ["iter_1", "iter_2"]), ("train", "iter_2", 1),
        ("trained", "iter_3", prm), ("train", "iter_3", 1)]
    assert [entry[2] for entry in log if entry[0] == "rollout"] == ["/start", model[1], model[2]]
    assert is_done(run_dir / "iter_2" / "prm") and not (run_dir / "iter_1" / "prm").exists()
    assert not (run_dir / "iter_3" / "prm").exists()

    log.clear()
    run(cfg)
    assert log == []
    import shutil

    shutil.rmtree(run_dir / "iter_3" / "process")
    run(cfg)  # the stages that read the redone process stage follow it: no pairs from old step values
    assert log == [("trained", "iter_3", prm), ("train", "iter_3", 1)]
    log.clear()
    run(cfg, redo=("prm",))  # iteration 2's PRM, then iteration 3's scoring with it and what follows
    assert log == [("train_prm", "iter_2", "/start", ["iter_1", "iter_2"]), ("trained", "iter_3", prm),
                   ("train", "iter_3", 1)]


def test_a_prm_backbone_with_another_tokenizer_is_refused_before_ray(tmp_path, bundled_model, monkeypatch):
    import shutil

    from transformers import AutoTokenizer

    import selfimprove.runtime

    def no_ray():
        raise AssertionError("Ray was started")

    monkeypatch.setattr(selfimprove.runtime, "init_ray", no_ray)
    backbone = tmp_path / "backbone"
    other = AutoTokenizer.from_pretrained(bundled_model)
    other.add_tokens(["<step>"])
    other.save_pretrained(backbone)
    shutil.copy(f"{bundled_model}/config.json", backbone)
    (backbone / "model.safetensors").symlink_to(f"{bundled_model}/model.safetensors")  # a folder needs weights
    cfg = load_config(None, ["pairs.source=process", "train.loss=orpo", "process.scorer=trained", "iterations=2",
                             f"process.prm_backbone={backbone}", f"model={bundled_model}", f"run_dir={tmp_path / 'r'}",
                             "task.generated_train=10", "task.generated_test=10"])
    with pytest.raises(UserError, match=r"backbone \(process.prm_backbone\) has another tokenizer than the policy "
                                        r".*\(49153 vs 49152 tokens"):
        run(cfg)
