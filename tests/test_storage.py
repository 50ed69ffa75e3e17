"""What nodes share (storage.py): models published by digest, fetched once per node, and the start-up probe."""

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from selfimprove import storage
from selfimprove.errors import UserError
from selfimprove.io import SUCCESS, folder_digest
from selfimprove.recipes import load_config
from selfimprove.rollout.stage import write_startups
from selfimprove.storage import STORED, fetch, publish, shared, unreachable


def _model(folder: Path) -> Path:
    """A stand-in model folder as a train stage leaves it: a config, weights in a subfolder, a tokenizer file, and
    the `_SUCCESS` of the stage output it is."""
    (folder / "sub").mkdir(parents=True)
    (folder / SUCCESS).write_text("")
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "sub" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "tokenizer.json").write_text("{}")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_model_is_published_under_its_digest_and_fetched_whole(tmp_path):
    model = _model(tmp_path / "run" / "iter_1" / "train" / "model")
    key = folder_digest(str(model))
    ref = publish(model, str(tmp_path / "store"))
    assert ref == f"{STORED}{tmp_path}/store/models/{key}"
    published = tmp_path / "store" / "models" / key
    # The manifest beside it, written last, lists the files; the folder is the model as it is.
    assert json.loads((published.parent / f"{key}.json").read_text()) == [
        "_SUCCESS", "config.json", "sub/model.safetensors", "tokenizer.json"]
    assert _files(published) == _files(model)
    got = fetch(ref.removeprefix(STORED), tmp_path / "cache")
    assert got == tmp_path / "cache" / key and _files(got) == _files(model)
    # On one machine both copies are links to the trained files: no second 270 MB per model.
    assert (got / "config.json").stat().st_ino == (model / "config.json").stat().st_ino
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [key, f"{key}.lock"]


def test_a_storage_uri_goes_through_its_file_system(tmp_path):
    """An fsspec URI (memory://, standing in for s3:// or gs://): the model is copied there and back, not linked."""
    model = _model(tmp_path / "model")
    key = folder_digest(str(model))
    ref = publish(model, f"memory://{tmp_path.name}/store")
    assert ref == f"{STORED}memory://{tmp_path.name}/store/models/{key}"
    got = fetch(ref.removeprefix(STORED), tmp_path / "cache")
    assert _files(got) == _files(model)
    assert (got / "config.json").stat().st_ino != (model / "config.json").stat().st_ino


def test_publishing_again_copies_nothing(tmp_path, monkeypatch):
    model = _model(tmp_path / "model")
    ref = publish(model, str(tmp_path / "store"))
    monkeypatch.setattr(storage, "_copy", lambda *a: pytest.fail("copied a published model again"))
    assert publish(model, str(tmp_path / "store")) == ref


def test_a_copy_killed_midway_is_cleared_and_never_read(tmp_path):
    """A fetch killed mid-copy leaves `<digest>.tmp-<pid>`, never `<digest>`: the next fetch clears it, copies again."""
    model = _model(tmp_path / "model")
    uri = publish(model, str(tmp_path / "store")).removeprefix(STORED)
    key = uri.rsplit("/", 1)[1]
    half = tmp_path / "cache" / f"{key}.tmp-4242"
    half.mkdir(parents=True)
    (half / "config.json").write_text('{"model_ty')
    got = fetch(uri, tmp_path / "cache")
    assert _files(got) == _files(model) and not half.exists()


def test_a_damaged_stored_copy_is_refused_and_not_cached(tmp_path):
    model = _model(tmp_path / "model")
    uri = publish(model, str(tmp_path / "store")).removeprefix(STORED)
    key = uri.rsplit("/", 1)[1]
    weights = Path(uri) / "sub" / "model.safetensors"
    weights.unlink()  # a link to the trained file: replace it, do not edit that
    weights.write_bytes(b"\0" * 10)
    with pytest.raises(RuntimeError, match=f"^the model copied from {uri} has digest [0-9a-f]{{16}}: storage holds a "
                                           "damaged copy$"):
        fetch(uri, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{key}.lock"]


def test_fetching_from_a_storage_without_the_model_names_it(tmp_path):
    uri = f"{tmp_path}/store/models/0123456789abcdef"
    with pytest.raises(RuntimeError, match=f"^{uri} holds no published model"):
        fetch(uri, tmp_path / "cache")


def _fetch_after(barrier, uri: str, cache: Path, out):
    barrier.wait()
    out.put(str(fetch(uri, cache)))


def test_concurrent_fetches_on_one_node_copy_once(tmp_path, monkeypatch):
    """Four processes of one node fetch the same model at once: each file is copied once (every copy is logged by
    the forked processes' `_copy`), and all four get the same whole folder."""
    model = _model(tmp_path / "model")
    uri = publish(model, str(tmp_path / "store")).removeprefix(STORED)
    log, real = tmp_path / "copies.log", storage._copy

    def logged(src_fs, src, dst_fs, dst):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {src}\n")
        real(src_fs, src, dst_fs, dst)

    monkeypatch.setattr(storage, "_copy", logged)
    context = multiprocessing.get_context("fork")
    barrier, out = context.Barrier(4), context.Queue()
    procs = [context.Process(target=_fetch_after, args=(barrier, uri, tmp_path / "cache", out)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 4 and len({line.split()[0] for line in lines}) == 1, lines
    assert set(got) == {str(tmp_path / "cache" / uri.rsplit("/", 1)[1])}
    assert _files(Path(got[0])) == _files(model)


def test_shared_hands_on_a_folder_as_stored_only_with_a_storage(tmp_path, monkeypatch):
    model = _model(tmp_path / "model")
    monkeypatch.setattr(storage, "_storage", None)
    assert shared(str(model)) == str(model)  # a one-machine run: the folder itself
    storage.use(str(tmp_path / "store"))
    ref = shared(str(model))
    assert ref == f"{STORED}{tmp_path}/store/models/{folder_digest(str(model))}"
    assert shared(ref) == ref
    assert shared("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"  # every node resolves a hub id
    monkeypatch.setenv("SELFIMPROVE_HOME", str(tmp_path / "home"))
    assert storage.local(ref) == str(tmp_path / "home" / "cache" / "models" / folder_digest(str(model)))
    assert storage.local(str(model)) == str(model)


def test_the_refusal_names_the_node_and_the_path():
    answers = {"10.0.0.1 (aaaaaaaa)": None, "10.0.0.2 (bbbbbbbb)": "it does not see /mnt/s/probes/x/driver, which "
               "the driver wrote", "10.0.0.3 (cccccccc)": "no answer in 120 s"}
    assert unreachable("/mnt/s", answers) == (
        "node 10.0.0.2 (bbbbbbbb) (and 1 more node(s)) cannot share files with the driver through storage_path=/mnt/s: "
        "it does not see /mnt/s/probes/x/driver, which the driver wrote; storage_path must be a folder every node "
        "mounts at the same path, or a URI every node reaches")
    assert unreachable("/mnt/s", {"10.0.0.1 (aaaaaaaa)": None}) is None


def test_a_cluster_of_two_nodes_needs_a_storage_path(monkeypatch):
    import ray

    nodes = [{"NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1", "Alive": True},
             {"NodeID": "b" * 56, "NodeManagerAddress": "10.0.0.2", "Alive": True},
             {"NodeID": "c" * 56, "NodeManagerAddress": "10.0.0.3", "Alive": False}]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    with pytest.raises(UserError, match=r"^the Ray cluster has 2 nodes and storage_path is not set: set storage_path "
                                        r"to a folder every node mounts at the same path, or a URI all reach"):
        storage.check_storage(None)
    monkeypatch.setattr(ray, "nodes", lambda: nodes[:1])
    storage.check_storage(None)


def test_every_node_of_a_local_cluster_reaches_a_local_storage(ray_local, tmp_path):
    storage.check_storage(str(tmp_path / "store"))
    assert list((tmp_path / "store" / "probes").iterdir()) == []  # the probe is cleared


def test_a_storage_the_driver_cannot_write_is_refused(tmp_path, ray_local):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=f"^cannot write storage_path={tmp_path}/file from the driver: "):
        storage.check_storage(f"{tmp_path}/file")


def test_the_old_key_points_to_the_new_one():
    with pytest.raises(UserError, match=r"^defaults: 'train.storage_path' is now 'storage_path' \(the storage all "
                                        r"nodes share: models and checkpoints\)$"):
        load_config(None, ["train.storage_path=/mnt/ckpt"])


def test_engine_startups_travel_in_rows_and_the_driver_writes_them(tmp_path):
    """Values of the STARTUP column: one engine's record, or a guide engine's then a solver engine's."""
    guide = json.dumps({"engine": "node-b-7", "began": 1.0, "ready": 9.5})
    solver = json.dumps({"engine": "node-a-5", "began": 2.0, "ready": 12.0})
    write_startups(tmp_path / "engines", {solver, f"{guide}\n{solver}", None})
    assert {p.name: json.loads(p.read_text()) for p in (tmp_path / "engines").iterdir()} == {
        "node-a-5.json": {"began": 2.0, "ready": 12.0}, "node-b-7.json": {"began": 1.0, "ready": 9.5}}
    write_startups(tmp_path / "none", {None})
    assert not (tmp_path / "none").exists()
