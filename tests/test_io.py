"""Stage outputs never cost a user's files: only empty folders and folders selfimprove wrote are replaced or deleted."""

import os

import pytest

from selfimprove.errors import UserError
from selfimprove.io import (
    MARKER,
    SUCCESS,
    claim_folder,
    is_damaged,
    is_done,
    remove_ours,
    stage_output,
    success_record,
    write_atomic,
)


def _snapshot(folder):
    """Every path under `folder` with its bytes (None for a folder): equal snapshots mean nothing was touched."""
    return {p.relative_to(folder): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def _users_folder(path):
    path.mkdir()
    (path / "thesis.tex").write_text("three years of work")
    return _snapshot(path)


def test_a_users_folder_as_final_is_refused_before_the_stage_starts(tmp_path):
    final = tmp_path / "out"
    before = _users_folder(final)
    with pytest.raises(UserError) as e, stage_output(final):
        pytest.fail("the stage ran")
    assert str(e.value) == f"{final} exists and was not written by selfimprove; move it away or choose another path"
    assert _snapshot(final) == before and not (tmp_path / "out.partial").exists()


def test_a_folder_of_ours_is_replaced(tmp_path):
    final = tmp_path / "out"
    for text in ("first", "second"):
        with stage_output(final) as scratch:
            (scratch / "result.txt").write_text(text)
    assert (final / "result.txt").read_text() == "second" and is_done(final) and (final / MARKER).is_file()
    assert not (tmp_path / "out.partial").exists()


def test_an_empty_folder_is_used_and_a_folder_finished_before_the_marker_replaced(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "_SUCCESS").touch()
    for name in ("empty", "old"):
        with stage_output(tmp_path / name) as scratch:
            (scratch / "result.txt").write_text(name)
        assert (tmp_path / name / "result.txt").read_text() == name


def test_a_partial_that_is_not_ours_is_not_deleted(tmp_path):
    partial = tmp_path / "out.partial"
    before = _users_folder(partial)
    with pytest.raises(UserError) as e, stage_output(tmp_path / "out"):
        pytest.fail("the stage ran")
    assert str(e.value) == f"{partial} exists and was not written by selfimprove; move it away or choose another path"
    assert _snapshot(partial) == before and not (tmp_path / "out").exists()


def test_a_partial_of_ours_left_by_a_killed_stage_is_cleared(tmp_path):
    with pytest.raises(RuntimeError), stage_output(tmp_path / "out") as scratch:
        (scratch / "half.txt").write_text("half")
        raise RuntimeError("killed")
    with stage_output(tmp_path / "out") as scratch:
        assert sorted(p.name for p in scratch.iterdir()) == [MARKER]


def test_a_symlink_is_never_ours(tmp_path):
    """Even pointing at a folder of ours: replacing the link would act on someone's pointer."""
    with stage_output(tmp_path / "ours"):
        pass
    (tmp_path / "link").symlink_to(tmp_path / "ours")
    with pytest.raises(UserError) as e, stage_output(tmp_path / "link"):
        pytest.fail("the stage ran")
    assert str(e.value) == f"{tmp_path / 'link'} exists and was not written by selfimprove; move it away or choose another path"
    assert (tmp_path / "link").is_symlink() and is_done(tmp_path / "ours")


def test_storage_cleanup_leaves_a_pre_existing_folder_alone(tmp_path):
    """What the trainers do with Ray Train's storage beside their output: claim it, later remove it if ours."""
    storage = tmp_path / "model.ray"
    before = _users_folder(storage)
    message = f"{storage} exists and was not written by selfimprove; move it away or choose another path"
    with pytest.raises(UserError) as e:
        claim_folder(storage)
    assert str(e.value) == message
    with pytest.raises(UserError) as e:
        remove_ours(storage)
    assert str(e.value) == message
    assert _snapshot(storage) == before


def test_storage_we_claimed_is_removed(tmp_path):
    storage = claim_folder(tmp_path / "model.ray")
    (storage / "checkpoint").mkdir()
    remove_ours(storage)
    assert not storage.exists()


def test_write_atomic_replaces_whole_and_leaves_no_temp_file(tmp_path):
    write_atomic(tmp_path / "report.md", "old\n")
    write_atomic(tmp_path / "report.md", "new\n")
    write_atomic(tmp_path / "accuracy.png", b"\x89PNG")
    assert (tmp_path / "report.md").read_text() == "new\n" and (tmp_path / "accuracy.png").read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "report.md"]


def test_write_atomic_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    write_atomic(tmp_path / "metrics.jsonl", "old\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        write_atomic(tmp_path / "metrics.jsonl", "new\n")
    assert (tmp_path / "metrics.jsonl").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_success_marker_whose_write_fails_is_not_left_half_written(tmp_path, monkeypatch):
    """The disk fails as the marker is written: no `_SUCCESS` at all (nor a temp file), so the folder is unfinished
    and the next attempt replaces it. Written in place, an empty or half marker would be left."""
    def disk_full(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", disk_full)
        with pytest.raises(OSError, match="No space left on device"), stage_output(tmp_path / "out", {"n": 1}) as scratch:
            (scratch / "result.txt").write_text("first")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "result.txt"]
    assert not is_done(tmp_path / "out") and not is_damaged(tmp_path / "out")
    with stage_output(tmp_path / "out", {"n": 2}) as scratch:
        (scratch / "result.txt").write_text("second")
    assert success_record(tmp_path / "out") == {"n": 2} and (tmp_path / "out" / "result.txt").read_text() == "second"


@pytest.mark.parametrize("marker", [b"", b'{"inputs": {"data": "ab', b"\0" * 8, b"[]", b"\xff\xfe"],
                         ids=["empty", "cut-short", "zeros", "not-a-record", "not-text"])
def test_a_damaged_success_marker_is_not_finished_and_the_folder_is_redone(tmp_path, marker):
    """What a disk that lost a marker's last write can hold: the folder is not finished, is still ours, and the
    next attempt replaces it with a whole marker."""
    with stage_output(tmp_path / "out", {"n": 1}):
        pass
    (tmp_path / "out" / MARKER).unlink()  # as folders finished before the marker existed: `_SUCCESS` says it is ours
    (tmp_path / "out" / SUCCESS).write_bytes(marker)
    assert not is_done(tmp_path / "out") and is_damaged(tmp_path / "out")
    with stage_output(tmp_path / "out", {"n": 2}):
        pass
    assert is_done(tmp_path / "out") and success_record(tmp_path / "out") == {"n": 2}


def test_a_stage_without_a_record_writes_a_whole_empty_one(tmp_path):
    with stage_output(tmp_path / "out"):
        pass
    assert (tmp_path / "out" / SUCCESS).read_text() == "{}" and is_done(tmp_path / "out")
