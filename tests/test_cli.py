"""The command line: each bad input is one line on stderr, exit code 2, no traceback, no Ray started."""

import json
import re
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run

from selfimprove.io import read_table


@pytest.fixture
def files(tmp_path):
    def write(name, text):
        p = tmp_path / name
        p.write_text(text)
        return p
    return write


@pytest.mark.parametrize("yaml_text, fragment", [
    ("rollout:\n  nn: 1\n", "c.yaml: unknown key 'rollout.nn'"),
    ("rollout:\n  n: many\n", "c.yaml: 'rollout.n' must be int, got str 'many'"),
    ("task:\n  name: chess\n", "unknown task 'chess' (known: arithmetic, arc, gsm8k, math, functions, mbpp, humaneval)"),
])
def test_bad_config(files, yaml_text, fragment):
    assert_one_line_error(run("eval", "smollm2-135m-instruct", "--config", files("c.yaml", yaml_text)), fragment)


def test_missing_config_file(tmp_path):
    assert_one_line_error(run("eval", "smollm2-135m-instruct", "--config", tmp_path / "nope.yaml"),
                          "config file not found:")


def test_unknown_task_flag():
    assert_one_line_error(run("eval", "smollm2-135m-instruct", "--task", "chess"), "unknown task 'chess'")


def test_dataset_path_missing(tmp_path):
    assert_one_line_error(run("eval", "smollm2-135m-instruct", "--task", "gsm8k", "--data", tmp_path / "none.jsonl"),
                          "dataset path not found:")


@pytest.mark.parametrize("content, fragment", [
    ('{"question": "q", "answer": "a\\n#### 1"}\n{not json\n', "test.jsonl:2: not valid JSON"),
    ('{"answer": "x\\n#### 1"}\n', "test.jsonl:1: row has no 'question'"),
    ('{"question": "q"}\n', "test.jsonl: 1 of the 1 held-out problems have no answer, which evaluation needs"),
])
def test_bad_dataset_rows(files, content, fragment):
    done = run("eval", "smollm2-135m-instruct", "--task", "gsm8k", "--data", files("test.jsonl", content))
    assert_one_line_error(done, fragment)


def test_empty_dataset_says_empty(files):
    done = run("eval", "smollm2-135m-instruct", "--task", "gsm8k", "--data", files("test.jsonl", ""))
    assert_one_line_error(done, "test.jsonl: split 'test' has no rows")


def test_model_that_resolves_to_nothing(tmp_path):
    assert_one_line_error(run("eval", "./no/such/model"), "model './no/such/model' resolves to nothing")
    done = run("eval", "smollm2-135m-instruct", "--guide", "./no/such/guide", "--out", tmp_path / "out")
    assert_one_line_error(done, "model './no/such/guide' resolves to nothing")
    assert not (tmp_path / "out").exists()


def test_corrupted_gguf(files, tmp_path, monkeypatch):
    monkeypatch.setenv("SELFIMPROVE_HOME", str(tmp_path / "home"))
    junk = files("junk.gguf", "GGUF? no." * 50)
    assert_one_line_error(run("prepare-model", junk), "corrupted or truncated GGUF file")


def test_prepare_model_unknown_name():
    assert_one_line_error(run("prepare-model", "gpt-17"), "'gpt-17' is neither a bundled model")


@pytest.mark.engine
def test_eval_end_to_end(tmp_path, bundled_model):
    out = tmp_path / "eval"
    done = run("eval", "smollm2-135m-instruct", "--task", "arithmetic", "--limit", 4, "--n", 2, "--out", out,
               "rollout.max_tokens=64", "rollout.batch_size=4", "eval.extra.wide.min_value=16",
               "eval.extra.wide.max_value=40")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pass@1" in done.stdout and "maj@2" in done.stdout and "wide" in done.stdout
    report = json.loads((out / "metrics.json").read_text())
    samples = read_table(out / "samples").to_pylist()
    assert len(samples) == 4 * 1 + 4 * 2
    greedy = [s for s in samples if s["pass"] == "greedy"]
    assert report["metrics"]["problems"] == 4
    assert report["metrics"]["pass@1"] == sum(s["correct"] for s in greedy) / 4
    assert {r["id"] for r in report["problems"]} == {s["problem_id"] for s in greedy}
    assert Path(out / "samples" / "_SUCCESS").is_file()
    # The extra set: the task's 4 problems but with numbers 16-40, scored on their own.
    wide = [s for s in read_table(out / "extra" / "wide" / "samples").to_pylist() if s["pass"] == "greedy"]
    assert len(wide) == 4 and all(all(16 <= int(n) <= 40 for n in re.findall(r"\d+", s["question"])) for s in wide)
    assert report["metrics"]["extra"]["wide"]["pass@1"] == sum(s["correct"] for s in wide) / 4


def test_eval_and_train_refuse_an_out_folder_they_did_not_write(files, tmp_path):
    """`--out` naming a user's folder: one line before any work (the model here has only a config, so any work
    would fail differently), and the folder is left as it was."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "mine"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "notes.txt").write_text("mine")
    for command in (["eval", model], ["train", files("c.yaml", f"model: {model}\n")]):
        done = run(*command, "--out", out)
        assert_one_line_error(done, "")
        assert done.stderr == (f"selfimprove: error: {out} exists and was not written by selfimprove; move it away "
                               "or choose another path\n")
        assert sorted(p.name for p in out.rglob("*")) == ["notes.txt", "samples"]
        assert (out / "samples" / "notes.txt").read_text() == "mine"
