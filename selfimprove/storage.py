"""What nodes share: only `storage_path`. Models and checkpoints travel through it, small records through Ray's
object store; nothing a process on another node opens is a path on the driver's disk.

What a process on another node reads or writes, and how it travels:

| who (on any node)                      | what                                | how                                 |
|----------------------------------------|-------------------------------------|-------------------------------------|
| engines (rollout, eval, guide, MC PRM) | the model they sample               | `stored:` reference -> node cache   |
| Ray Train workers (policy, PRM)        | the model (and reference) they load | `stored:` reference -> node cache   |
| Ray Train workers                      | checkpoints, the saved model        | Ray Train: `<storage>/checkpoints`  |
| the trained-PRM scoring task           | the PRM folder                      | `stored:` reference -> node cache   |
| engines                                | their start-up times                | in their rows; the driver writes    |
| Ray Data tasks                         | request and sample rows             | the object store (as before)        |
| the driver only                        | the run dir: stages, `_SUCCESS`     | opened nowhere else                 |

1. `storage_path` (run-level) is a folder every node mounts at the same path, or a URI pyarrow or fsspec knows
   (s3://, gs://, hdfs://...). Unset, the run is a one-machine run: engines open the driver's folders and
   checkpoints stay beside their stage, and a cluster of more than one node is refused at start.
2. `shared(ref)`, on the driver, where a model crosses to another process: a local model folder (the bundled
   model and a `.gguf` are folders by then) is published to `<storage>/models/<digest>/` (its files' content
   digest, `io.folder_digest`), once, its manifest (`<digest>.json`) written last, and handed on as
   `stored:<storage>/models/<digest>`. A hub id passes unchanged: every node downloads it itself. A trained
   model is published when the first stage hands it on.
3. `local(ref)`, in that process: a `stored:` model is copied into this node's cache,
   `$SELFIMPROVE_HOME/cache/models/<digest>`, once per node: under a lock file (concurrent actors of one node
   wait for one copy), into a temp folder checked against the digest, renamed into place (a reader never sees
   half a copy; a killed copy leaves a temp folder the next fetch clears). On one machine both copies are hard
   links: files here are written once, never edited.
4. `share_through` (at the start of a run and of `selfimprove eval`): a tiny task on every alive node reads a
   probe the driver wrote under `storage_path` and writes its own, which the driver reads back; a node that
   cannot is named in one line (`check_storage`); then this process `use`s it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

from selfimprove.errors import UserError, first_line

STORED = "stored:"  # a model reference that lives in storage: stored:<storage>/models/<digest>
# Beside a published model folder `<digest>/`, written last: its files, as a JSON list. Outside it: a trained
# model's folder holds a `_SUCCESS` of its own.
MANIFEST = ".json"
PROBE_SECONDS = 120  # how long every node gets to answer the start-up probe

_storage: str | None = None  # this process's storage_path (`use`); None: a one-machine run


def use(path: str | None) -> None:
    """Make `path` (a run's `storage_path`) where this process publishes the models it hands to other processes."""
    global _storage
    _storage = location(path) if path else None


def share_through(path: str | None) -> None:
    """What every command that starts engines or trainers does once Ray is up: check that all nodes reach `path` (a
    `storage_path`, or None for one machine), then `use` it."""
    check_storage(path and location(path))
    use(path)


def location(path: str) -> str:
    """A storage path as every process reads it: a URI as given, a folder made absolute (Ray Train and pyarrow read a
    relative path as a URI, and fail)."""
    return path.rstrip("/") if "://" in path else os.path.abspath(os.path.expanduser(path))


def filesystem(uri: str):
    """(pyarrow file system, path in it) for a folder or URI: pyarrow's own file systems, else fsspec's."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except pyarrow.ArrowInvalid:
        import fsspec.core

        fs, path = fsspec.core.url_to_fs(uri)
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def shared(ref: str) -> str:
    """What to hand another process for the model `ref`: a `stored:` reference for a local folder when this
    process has a storage (`use`), else `ref`."""
    if _storage is None or ref.startswith(STORED) or not Path(ref).is_dir():
        return ref
    return publish(Path(ref), _storage)


def publish(folder: Path, storage: str) -> str:
    """Copy the model `folder` to `<storage>/models/<its digest>` unless it is there; its `stored:` reference."""
    from selfimprove.io import folder_digest

    key = folder_digest(folder)
    uri = f"{storage}/models/{key}"
    fs, root = filesystem(uri)
    if fs.get_file_info(root + MANIFEST).is_file:
        return STORED + uri
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    local_fs, _ = filesystem(str(folder.resolve()))
    for name in files:
        _copy(local_fs, str(folder.resolve() / name), fs, f"{root}/{name}")
    _write(fs, root + MANIFEST, json.dumps(files))
    return STORED + uri


def local(ref: str) -> str:
    """A folder on this node for a `stored:` model (fetched into the node cache once), else `ref` as it is."""
    return str(fetch(ref[len(STORED):], cache())) if ref.startswith(STORED) else ref


def cache() -> Path:
    """This node's model cache."""
    from selfimprove.models import home

    return home() / "cache" / "models"


def fetch(uri: str, into: Path) -> Path:
    """`into/<digest>` holding the published model at `uri` (`<storage>/models/<digest>`), copied once.

    Under `into/<digest>.lock`: the first process of a node copies, the others wait and find it there. The copy goes
    to a temp folder, is checked against the digest, and is renamed into place.
    """
    from selfimprove.io import folder_digest

    key = uri.rstrip("/").rsplit("/", 1)[-1]
    final = into / key
    if final.is_dir():
        return final
    into.mkdir(parents=True, exist_ok=True)
    with _locked(into / f"{key}.lock"):
        if final.is_dir():
            return final
        for stale in into.glob(f"{key}.tmp-*"):  # a copy killed midway: nobody else copies while we hold the lock
            shutil.rmtree(stale)
        fs, root = filesystem(uri)
        try:
            files = json.loads(_read(fs, root + MANIFEST))
        except FileNotFoundError:
            raise RuntimeError(f"{uri} holds no published model (no {key}{MANIFEST} beside it): is storage_path the "
                               "same storage on every node?") from None
        tmp = into / f"{key}.tmp-{os.getpid()}"
        tmp_fs, _ = filesystem(str(tmp))
        for name in files:
            _copy(fs, f"{root}/{name}", tmp_fs, str(tmp / name))
        if (got := folder_digest(tmp)) != key:
            shutil.rmtree(tmp)
            raise RuntimeError(f"the model copied from {uri} has digest {got}: storage holds a damaged copy")
        tmp.rename(final)
    return final


def release(storage: str, path: str) -> None:
    """Remove the folder `path` under `storage` (ours: checkpoints of a training whose model is saved)."""
    fs, root = filesystem(f"{storage}/{path}")
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(root)


def check_storage(storage: str | None) -> None:
    """Refuse, in one line, a cluster some alive node of which cannot share files with the driver through
    `storage` (or, with no storage, a cluster of more than one node)."""
    import ray

    if not ray.is_initialized():  # no cluster to check (and a probe would start one)
        return
    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    if storage is None:
        if len(nodes) > 1:
            raise UserError(f"the Ray cluster has {len(nodes)} nodes and storage_path is not set: set storage_path to "
                            "a folder every node mounts at the same path, or a URI all reach (s3://, gs://)")
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    fs, root = filesystem(f"{storage}/probes/{token}")
    try:
        _write(fs, f"{root}/driver", token)
    except OSError as e:
        raise UserError(f"cannot write storage_path={storage} from the driver: {first_line(e)}") from None
    probe = ray.remote(_probe)
    refs = {probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(f"{storage}/probes/{token}", token, node): node for node in nodes}
    answers = dict.fromkeys(nodes, f"no answer in {PROBE_SECONDS} s")
    done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_SECONDS)
    for ref in done:
        try:
            answers[refs[ref]] = ray.get(ref)
        except Exception as e:  # the task could not run there
            answers[refs[ref]] = f"{type(e).__name__}: {first_line(e)}"
    for node, answer in answers.items():
        if answer is None and not _exists(fs, f"{root}/{node}"):
            answers[node] = "what it wrote there does not reach the driver"
    with contextlib.suppress(OSError):
        fs.delete_dir(root)
    if message := unreachable(storage, {f"{nodes[n]} ({n[:8]})": a for n, a in answers.items()}):
        raise UserError(message)


def unreachable(storage: str, answers: dict[str, str | None]) -> str | None:
    """The one-line refusal for probe `answers` (node -> what went wrong, or None), naming the first node that
    failed; None if all reached `storage`."""
    failed = [(node, why) for node, why in answers.items() if why is not None]
    if not failed:
        return None
    node, why = failed[0]
    more = f" (and {len(failed) - 1} more node(s))" if len(failed) > 1 else ""
    return (f"node {node}{more} cannot share files with the driver through storage_path={storage}: {why}; "
            "storage_path must be a folder every node mounts at the same path, or a URI every node reaches")


def _probe(folder: str, token: str, node: str) -> str | None:
    """On one node: read the driver's probe under `folder`, write this node's; what went wrong, or None."""
    try:
        fs, root = filesystem(folder)
        if not _exists(fs, f"{root}/driver"):
            return f"it does not see {folder}/driver, which the driver wrote"
        if _read(fs, f"{root}/driver") != token:
            return f"{folder}/driver holds something else than the driver wrote"
        _write(fs, f"{root}/{node}", token)
    except Exception as e:
        return f"{type(e).__name__}: {first_line(e)}"
    return None


def _exists(fs, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def _read(fs, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def _write(fs, path: str, text: str) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _copy(src_fs, src: str, dst_fs, dst: str) -> None:
    """One file, whole or not at all at `dst`: a hard link when both ends are this machine's disk, else a copy
    (object stores write an object whole; a local copy goes to a temp name, then is renamed)."""
    import pyarrow.fs

    dst_fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
    if not isinstance(dst_fs, pyarrow.fs.LocalFileSystem):
        pyarrow.fs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
        return
    tmp = f"{dst}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        if isinstance(src_fs, pyarrow.fs.LocalFileSystem):
            try:
                os.link(src, tmp)
            except OSError:  # another file system, or one without links
                shutil.copyfile(src, tmp)
        else:
            pyarrow.fs.copy_files(src, tmp, source_filesystem=src_fs, destination_filesystem=dst_fs)
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on the file `path` (the OS drops it if this process dies)."""
    with open(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
