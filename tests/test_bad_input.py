"""Bad input through the real command line (issue 13): config files, data files, model folders, run dirs, sizes,
resource requests and Ray addresses. Each case must give one line on stderr starting `selfimprove: error: ` that
names what is wrong and where, exit code 2, no traceback, in bounded time, and write nothing: the case's folder
(with its working directory and SELFIMPROVE_HOME) is the same file for file afterwards.

The commands run with a stand-in `ray` package that refuses to be imported (`Box.env`): a case that got as far
as Ray fails here loudly, and never starts a cluster. Only the wrong-token case joins a real (token-protected)
Ray head, started on 127.0.0.1 by the test and stopped by its process id.

The full matrix is marked `faults` (`make test-faults`); one quick case of each kind is left unmarked, so that
`make test` runs it.
"""

import contextlib
import errno
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run

from selfimprove.config import MAX_GENERATED, MAX_PROBLEMS, MAX_SAMPLES, MAX_TOKENS

FAULTS = pytest.mark.faults
ROOT = os.geteuid() == 0
CPUS = os.cpu_count() or 1


def tree(root: Path) -> dict:
    """Every path under `root` with its type and mode, and a file's size and modification time. (A folder's own
    times change when an entry comes and goes again: its entries are what is compared.)"""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            file = not stat.S_ISDIR(st.st_mode)
            found[os.path.relpath(os.path.join(folder, name), root)] = (st.st_mode, file and st.st_size,
                                                                         file and st.st_mtime_ns)
    return found


class Box:
    """A case's folder: a working directory, SELFIMPROVE_HOME, a model folder with a config and (empty) weights,
    and a config `run.yaml` that would pass every check (a small arithmetic task) but for what a case adds."""

    def __init__(self, root: Path, no_ray: Path):
        self.root, self.cwd, self.home = root, root / "cwd", root / "home"
        self.cwd.mkdir()
        self.model = root / "model"
        self.model.mkdir()
        (self.model / "config.json").write_text("{}")
        (self.model / "model.safetensors").write_bytes(b"")
        self.config = root / "run.yaml"
        self.config.write_text(f"model: {self.model}\ntask: {{generated_train: 8, generated_test: 8}}\n")
        self.env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(no_ray), os.environ.get("PYTHONPATH")])),
                    "SELFIMPROVE_HOME": str(self.home), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": None}

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def unreadable(self, name: str) -> Path:
        """A file that exists and cannot be read: mode 000, or, for root (whom modes do not stop), a link to
        /proc/self/mem, whose first page no process has mapped, so a read fails with EIO."""
        path = self.root / name
        if ROOT:
            path.symlink_to("/proc/self/mem")
        else:
            path.write_text("{}")
            path.chmod(0)
        return path

    def fails(self, *args, fragment: str, env: dict | None = None, ray: bool = False, seconds: float = 120) -> str:
        """Run the command; check the one-line error holding `fragment`, and that nothing under the root changed.
        `ray`: the real Ray package (else the stand-in that refuses to load)."""
        before = tree(self.root)
        env = {**self.env, **(env or {})}
        if ray:
            env["PYTHONPATH"] = os.environ.get("PYTHONPATH")
        done = run(*args, cwd=self.cwd, env=env, timeout=seconds)
        assert_one_line_error(done, fragment)
        assert tree(self.root) == before, "the command wrote or changed files"
        return done.stderr


@pytest.fixture(scope="session")
def no_ray(tmp_path_factory) -> Path:
    """A folder whose `ray` package fails to import: put first on PYTHONPATH, it stops any Ray work."""
    guard = tmp_path_factory.mktemp("no-ray")
    (guard / "ray").mkdir()
    (guard / "ray" / "__init__.py").write_text(
        'raise ImportError("bad-input test: the command got as far as importing Ray")\n')
    return guard


@pytest.fixture
def box(tmp_path, no_ray) -> Box:
    return Box(tmp_path, no_ray)


def closed_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on: bound, read and closed again."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture
def mount_tmpfs():
    """Mount a tmpfs with `options` on a folder (unmounted at the end), or skip: only root may mount."""
    mounted = []

    def mount(folder: Path, options: str) -> Path:
        folder.mkdir(exist_ok=True)
        if not shutil.which("mount"):
            pytest.skip("no mount command here; this case needs a tmpfs")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                              text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); this case needs one")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", str(folder)], check=True)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill a small file system with one file, leaving `leave` bytes (whole pages) free."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError as e:
            assert e.errno == errno.ENOSPC
    size = (folder / "filler").stat().st_size
    os.truncate(folder / "filler", size - leave)


# --- config files ----------------------------------------------------------------------------------------------

CONFIGS = [
    pytest.param(random.Random(0).randbytes(4096), "not a YAML text file (not UTF-8: ", id="random-bytes"),
    pytest.param(b"\0" * 100, "not valid YAML (unacceptable character #x0000", id="nul-bytes", marks=FAULTS),
    pytest.param(b"", "the file holds no settings; to use every default, write {} in it", id="empty", marks=FAULTS),
    pytest.param(b"# all defaults\n", "the file holds no settings", id="only-comments", marks=FAULTS),
    pytest.param(b"- rollout\n- n\n", "the top level must be a mapping", id="yaml-list", marks=FAULTS),
    pytest.param(b"rollout: {n: 1\n", "not valid YAML at line 2, column 1 (expected ',' or '}'", id="invalid-yaml",
                 marks=FAULTS),
    pytest.param(b"[" * 100_000, "not valid YAML (nested too deeply)", id="deeply-nested", marks=FAULTS),
]


@pytest.mark.parametrize("content, fragment", CONFIGS)
def test_config_file(box, content, fragment):
    config = box.file("c.yaml", content)
    box.fails("run", config, f"run_dir={box.root / 'r'}", fragment=f"{config}: {fragment}")


@FAULTS
@pytest.mark.parametrize("kind", ["folder", "unreadable"])
def test_config_file_that_cannot_be_read(box, kind):
    if kind == "folder":
        config = box.root / "c.yaml"
        config.mkdir()
        why = "Is a directory"
    else:
        config = box.unreadable("c.yaml")
        why = "Input/output error" if ROOT else "Permission denied"
    box.fails("run", config, f"run_dir={box.root / 'r'}", fragment=f"cannot read config file {config}: {why}")


# --- data files --------------------------------------------------------------------------------------------------

ROW = '{"question": "How many?", "answer": "Two.\\n#### 2"}\n'
DATA = [
    pytest.param("test.jsonl", b"", "test.jsonl: split 'test' has no rows", id="empty", marks=FAULTS),
    pytest.param("test.jsonl", random.Random(0).randbytes(4096), "test.jsonl:1: not UTF-8 text", id="random-bytes",
                 marks=FAULTS),
    pytest.param("test.jsonl", b"\0" * 100, "test.jsonl:1: not valid JSON", id="nul-bytes", marks=FAULTS),
    pytest.param("test.jsonl", ROW.encode("utf-16"), "test.jsonl: UTF-16 text (it starts with a UTF-16 byte-order "
                 "mark); save it as UTF-8", id="utf-16", marks=FAULTS),
    pytest.param("test.jsonl", (ROW + ROW.replace("How", "Combien de caf\u00e9s")).encode("latin-1"),
                 "test.jsonl:2: not UTF-8 text (invalid continuation byte", id="latin-1", marks=FAULTS),
    pytest.param("test.jsonl", b"[" * 100_000, "test.jsonl:1: not valid JSON (nested too deeply)", id="nested"),
    pytest.param("test.json", b"[" * 100_000, "test.json:1: not valid JSON (nested too deeply)", id="nested-json",
                 marks=FAULTS),
    pytest.param("test.parquet", b"PAR1" + b"not parquet" * 100, "test.parquet: not a readable Parquet file",
                 id="not-parquet", marks=FAULTS),
]


@pytest.mark.parametrize("name, content, fragment", DATA)
def test_data_file(box, name, content, fragment):
    box.fails("eval", box.model, "--task", "gsm8k", "--data", box.file(name, content), fragment=fragment)


def parquet_bytes(rows: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


@FAULTS
def test_data_file_truncated_parquet(box):
    whole = parquet_bytes([{"question": f"q{i}", "answer": f"a\n#### {i}"} for i in range(500)])
    data = box.file("test.parquet", whole[: len(whole) // 2])
    box.fails("eval", box.model, "--task", "gsm8k", "--data", data, fragment=f"{data}: not a readable Parquet file")


@FAULTS
def test_data_file_unreadable(box):
    data = box.unreadable("test.jsonl")
    why = "Input/output error" if ROOT else "Permission denied"
    box.fails("eval", box.model, "--task", "gsm8k", "--data", data, fragment=f"{data}: cannot read ({why})")


@FAULTS
def test_data_file_through_run_leaves_no_run_dir(box):
    data = box.file("train.jsonl", b"[" * 100_000)
    box.fails("run", box.config, "task.name=gsm8k", f"task.data={data}", f"run_dir={box.root / 'r'}",
              fragment=f"{data}:1: not valid JSON (nested too deeply)")


@FAULTS
def test_data_file_one_huge_line(box):
    """50 MB of one JSON string and no newline: one line in bounded time and memory (a few times the file)."""
    data = box.file("test.jsonl", b'"' + b"x" * 50_000_000 + b'"')
    before = tree(box.root)
    env = {k: v for k, v in {**os.environ, **box.env}.items() if v is not None}
    # The peak is read by a small Python that starts the command: a child forked from this test process would
    # count this process's own pages (torch and all) in its peak.
    peak = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL, "
            "timeout=120); print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    measured = subprocess.run([sys.executable, "-c", peak, sys.executable, "-m", "selfimprove", "eval", box.model,
                               "--task", "gsm8k", "--data", data], cwd=box.cwd, env=env, capture_output=True, text=True)
    code, max_rss_kib = map(int, measured.stdout.split())
    done = subprocess.CompletedProcess(measured.args, code, "", measured.stderr)
    assert_one_line_error(done, f"{data}:1: expected a JSON object, got str")
    assert max_rss_kib * 1024 < 1 << 30, f"peak memory {max_rss_kib // 1024} MB for a 50 MB file"
    assert tree(box.root) == before


@FAULTS
@pytest.mark.parametrize("content", ["empty", "not-parquet", "truncated", "unreadable"])
def test_train_data_file(box, content):
    whole = parquet_bytes([{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(200)])
    if content == "unreadable":
        data = box.unreadable("pairs.parquet")
    else:
        data = box.file("pairs.parquet", {"empty": b"", "not-parquet": b"prompt,chosen,rejected\np,a,b\n",
                                          "truncated": whole[:-100]}[content])
    box.fails("train", box.config, "--data", data, fragment=f"{data}: not readable Parquet (")


# --- model folders and files -------------------------------------------------------------------------------------

def gguf_bytes() -> bytes:
    """A small but real GGUF file: header, metadata and one tensor, written by the `gguf` package."""
    import numpy as np
    from gguf import GGUFWriter

    with tempfile.TemporaryDirectory() as folder:
        writer = GGUFWriter(f"{folder}/m.gguf", "llama")
        writer.add_block_count(1)
        writer.add_context_length(128)
        writer.add_embedding_length(16)
        writer.add_tensor("token_embd.weight", np.ones((64, 16), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return Path(f"{folder}/m.gguf").read_bytes()


@pytest.mark.parametrize("command", [pytest.param("eval", id="eval"), pytest.param("run", id="run", marks=FAULTS)])
def test_model_folder_without_weights(box, command):
    (box.model / "model.safetensors").unlink()
    fragment = f"model folder {box.model} has a config.json but no weights (*.safetensors"
    if command == "eval":
        box.fails("eval", box.model, "--limit", 1, fragment=fragment)
    else:
        box.fails("run", box.config, f"run_dir={box.root / 'r'}", fragment=fragment)


@FAULTS
@pytest.mark.parametrize("cut", ["header", "tensors", "empty"])  # within the metadata, within the tensor data
@pytest.mark.parametrize("command", ["prepare-model", "eval"])
def test_truncated_gguf(box, cut, command):
    whole = gguf_bytes()
    assert whole[:4] == b"GGUF"
    path = box.file("m.gguf", {"header": whole[:60], "tensors": whole[:-1000], "empty": b""}[cut])
    box.fails(command, path, fragment=f"corrupted or truncated GGUF file {path}: {'the file is empty' if cut == 'empty' else ''}")


# --- run dirs ----------------------------------------------------------------------------------------------------

def test_run_dir_that_is_a_file(box):
    run_dir = box.file("r", "my notes")
    box.fails("run", box.config, f"run_dir={run_dir}", fragment=f"cannot write the run dir {run_dir}: it is a file, "
              "not a folder")


@FAULTS
def test_run_dir_under_a_file(box):
    run_dir = box.file("f", "my notes") / "r"
    box.fails("run", box.config, f"run_dir={run_dir}", fragment=f"cannot write the run dir {run_dir}: Not a directory")


@FAULTS
@pytest.mark.parametrize("where", ["new", "existing"])
def test_run_dir_read_only(box, mount_tmpfs, where):
    """Root writes through any mode, so for root the folder is a read-only tmpfs."""
    folder = box.root / "ro"
    if ROOT:
        mount_tmpfs(folder, "ro,size=1m")
    else:
        folder.mkdir()
        folder.chmod(0o555)
    run_dir = folder / "r" if where == "new" else folder
    why = "Read-only file system" if ROOT else "Permission denied"
    box.fails("run", box.config, f"run_dir={run_dir}", fragment=f"cannot write the run dir {run_dir}: {why}")


@FAULTS
@pytest.mark.parametrize("free, where", [(0, "new"), (4096, "new"), (4096, "existing"), (0, "new/deeper")])
def test_run_dir_on_a_full_disk(box, mount_tmpfs, free, where):
    """A full tmpfs, or one with one page left (the lock file takes it, config.yaml finds none): one line naming the
    run dir, and the claim takes back what it made (folders, marker, lock file); an existing folder stays as it was."""
    disk = mount_tmpfs(box.root / "disk", "size=64k")
    if where == "existing":
        (disk / "r").mkdir()
    fill(disk, leave=free)
    run_dir = disk / ("r" if where != "new/deeper" else "r/deeper")
    box.fails("run", box.config, f"run_dir={run_dir}",
              fragment=f"cannot write the run dir {run_dir}: No space left on device")


# --- sizes -------------------------------------------------------------------------------------------------------

HUGE = 10**12
SIZES = [
    ("rollout.max_tokens", 0, "'rollout.max_tokens' must be > 0, got 0"),
    ("rollout.max_tokens", -1, "'rollout.max_tokens' must be > 0, got -1"),
    ("rollout.max_tokens", ".inf", "'rollout.max_tokens' must be int, got float inf"),
    ("rollout.max_tokens", "1e30", "'rollout.max_tokens' must be int, got str '1e30'"),
    ("rollout.max_tokens", HUGE, f"rollout.max_tokens={HUGE} leaves no room for a prompt in rollout.max_model_len=1024"),
    ("rollout.max_model_len", HUGE, f"'rollout.max_model_len' must be at most {MAX_TOKENS:,}, got {HUGE}"),
    ("rollout.n", 0, "'rollout.n' must be > 0, got 0"),
    ("rollout.n", -1, "'rollout.n' must be > 0, got -1"),
    ("rollout.n", ".inf", "'rollout.n' must be int, got float inf"),
    ("rollout.n", "1e30", "'rollout.n' must be int, got str '1e30'"),
    ("rollout.n", HUGE, f"'rollout.n' must be at most {MAX_SAMPLES:,}, got {HUGE}"),
    ("eval.k", HUGE, f"'eval.k' must be at most {MAX_SAMPLES:,}, got {HUGE}"),
    ("process.k", HUGE, f"'process.k' must be at most {MAX_SAMPLES:,}, got {HUGE}"),
    ("task.generated_train", 0, "'task.generated_train' must be > 0, got 0"),
    ("task.generated_train", -1, "'task.generated_train' must be > 0, got -1"),
    ("task.generated_train", ".inf", "'task.generated_train' must be int, got float inf"),
    ("task.generated_train", "1e30", "'task.generated_train' must be int, got str '1e30'"),
    ("task.generated_train", HUGE, f"'task.generated_train' must be at most {MAX_GENERATED:,}, got {HUGE}"),
    ("task.train_size", 0, "'task.train_size' must be > 0, got 0"),
    ("task.train_size", -1, "'task.train_size' must be > 0, got -1"),
    ("task.train_size", ".inf", "'task.train_size' must be int, got float inf"),
    ("task.train_size", HUGE, f"'task.train_size' must be at most {MAX_PROBLEMS:,}, got {HUGE}"),
]


@pytest.mark.parametrize("key, value, fragment", [
    pytest.param(*case, id=f"{case[0]}={case[1]}", marks=() if case[:2] == ("rollout.n", HUGE) else FAULTS)
    for case in SIZES])
def test_size_in_run(box, key, value, fragment):
    box.fails("run", box.config, f"{key}={value}", f"run_dir={box.root / 'r'}", fragment=f"{box.config}: {fragment}")


@pytest.mark.parametrize("override, fragment", [
    ("rollout.temperature=.inf", "'rollout.temperature' must be a finite number, got inf"),
    ("train.lr=.nan", "'train.lr' must be a finite number, got nan"),
])
def test_non_finite_float_in_run(box, override, fragment):
    """YAML reads `.inf` and `.nan` as floats, which the knobs' comparisons would let through."""
    box.fails("run", box.config, override, f"run_dir={box.root / 'r'}", fragment=f"{box.config}: {fragment}")


@pytest.mark.parametrize("args, fragment", [
    # A flag's error names the flag typed, not the knob it sets (--limit: task.test_size, or train_size with
    # --split train).
    pytest.param(["--limit", 0], "error: --limit must be > 0, got 0", id="limit=0", marks=FAULTS),
    pytest.param(["--limit", -1], "error: --limit must be > 0, got -1", id="limit=-1"),
    pytest.param(["--split", "train", "--limit", -1], "error: --limit must be > 0, got -1", id="train-limit=-1"),
    pytest.param(["--limit", "inf"], "argument --limit: invalid int value: 'inf' (see selfimprove eval --help)",
                 id="limit=inf"),
    pytest.param(["--limit", "1e30"], "argument --limit: invalid int value: '1e30'", id="limit=1e30", marks=FAULTS),
    pytest.param(["--limit", HUGE], f"error: --limit must be at most {MAX_PROBLEMS:,}, got {HUGE}", id="limit=huge",
                 marks=FAULTS),
    pytest.param(["--n", 0], "error: --n must be > 0, got 0", id="n=0"),
    pytest.param(["--n", HUGE], f"error: --n must be at most {MAX_SAMPLES:,}, got {HUGE}", id="n=huge", marks=FAULTS),
    pytest.param(["--split", "dev"], "error: --split must be one of train, val, test, got 'dev'", id="split=dev",
                 marks=FAULTS),
    pytest.param(["rollout.max_tokens=0"], "'rollout.max_tokens' must be > 0, got 0", id="max_tokens=0", marks=FAULTS),
    pytest.param(["rollout.max_tokens=.inf"], "'rollout.max_tokens' must be int, got float inf", id="max_tokens=inf",
                 marks=FAULTS),
    pytest.param(["task.generated_test=-1"], "'task.generated_test' must be > 0, got -1", id="generated_test=-1",
                 marks=FAULTS),
])
def test_size_in_eval(box, args, fragment):
    box.fails("eval", box.model, *args, fragment=fragment)


# --- resources this machine can never give (Ray would run locally) ------------------------------------------------

MANY = max(64, CPUS + 1)
RESOURCES = [
    pytest.param("run", [f"rollout.num_actors={MANY}", "rollout.cpus_per_actor=8"],
                 f"rollout.num_actors={MANY} engine(s) x 8 core(s) (rollout.cpus_per_actor=8) = {MANY * 8}, but this "
                 f"machine has {CPUS} cores and Ray runs on it alone (RAY_ADDRESS is not set)", id="run-actors"),
    pytest.param("run", [f"rollout.num_actors={CPUS + 1}"],
                 f"rollout.num_actors={CPUS + 1} engine(s) x 1 core(s) (rollout.cpus_per_actor=0) = {CPUS + 1}, but",
                 id="run-actors-of-one-core", marks=FAULTS),
    pytest.param("run", ["rollout.cpu_kvcache_gib=1000000"],
                 "rollout.num_actors=1 engine(s) x rollout.cpu_kvcache_gib=1000000 GiB of KV cache = 1000000, but this "
                 "machine has", id="run-kv-cache", marks=FAULTS),
    pytest.param("run", [f"train.num_workers={MANY}", "train.micro_batch_size=1", f"train.batch_size={MANY}"],
                 f"train.num_workers={MANY} worker(s) x 1 core(s) (train.cpus_per_worker=0) = {MANY}, but this machine "
                 f"has {CPUS} cores", id="run-workers", marks=FAULTS),
    pytest.param("train", ["train.num_workers=1", f"train.cpus_per_worker={CPUS + 1}"],
                 f"train.num_workers=1 worker(s) x {CPUS + 1} core(s) (train.cpus_per_worker={CPUS + 1}) = {CPUS + 1}",
                 id="train-cores", marks=FAULTS),
    pytest.param("eval", [f"rollout.num_actors={MANY}", "rollout.cpus_per_actor=8"],
                 f"rollout.num_actors={MANY} engine(s) x 8 core(s)", id="eval-actors", marks=FAULTS),
    # No knob asks for GPUs: they are used where Ray has them (rollout.tensor_parallel_size is ignored on CPU).
    pytest.param("run", ["train.use_gpu=true"], "unknown key 'train.use_gpu'", id="run-use-gpu", marks=FAULTS),
]


@pytest.mark.parametrize("command, overrides, fragment", RESOURCES)
def test_resources_this_machine_never_has(box, command, overrides, fragment):
    if command == "run":
        box.fails("run", box.config, *overrides, f"run_dir={box.root / 'r'}", fragment=fragment)
    elif command == "eval":
        box.fails("eval", box.model, "--limit", 1, *overrides, fragment=fragment)
    else:
        data = box.file("pairs.parquet", parquet_bytes([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 4))
        box.fails("train", box.config, "--data", data, *overrides, fragment=fragment)


# --- Ray addresses ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, host, scheme", [
    pytest.param("eval", "127.0.0.1", "", id="eval"),
    pytest.param("run", "127.0.0.1", "", id="run", marks=FAULTS),
    pytest.param("eval", "127.0.0.1", "ray://", id="ray-client", marks=FAULTS),
    pytest.param("eval", "::1", "", id="ipv6", marks=FAULTS),
])
def test_ray_address_with_nothing_listening(box, command, host, scheme):
    try:
        port = closed_port(host)
    except OSError as e:
        pytest.skip(f"no {host} on this machine ({e.strerror})")
    address = f"{scheme}{'[::1]' if host == '::1' else host}:{port}"
    args = ["eval", box.model, "--limit", 1] if command == "eval" else ["run", box.config, f"run_dir={box.root / 'r'}"]
    start = time.monotonic()
    box.fails(*args, env={"RAY_ADDRESS": address}, seconds=90,
              fragment=f"nothing answers at RAY_ADDRESS={address} (Connection refused)")
    assert time.monotonic() - start < 60


@pytest.fixture
def token_ray_head():
    """A Ray head on 127.0.0.1 that wants the token it yields: no CPUs, no dashboard, its own temp dir (so that
    no other Ray on the machine finds it); its processes are stopped by their ids at the end."""
    import importlib.util

    import psutil

    if importlib.util.find_spec("ray._private.authentication") is None:
        pytest.skip("this Ray has no token authentication")
    port, token = closed_port(), "right-" + "0123456789abcdef" * 2
    temp = tempfile.mkdtemp(prefix="ray-bad-input-", dir="/tmp")  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=0", "--include-dashboard=false",
                             "--object-store-memory=100000000", f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    processes = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.skip("the token-protected Ray head did not start")
                time.sleep(0.5)
        time.sleep(2)  # its other processes
        processes = psutil.Process(head.pid).children(recursive=True)
        yield f"127.0.0.1:{port}", token
    finally:
        # `ray start` stops its processes itself on SIGTERM, but takes over half a minute: the group is killed after
        # a few seconds, then any process of the head left outside it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        # Its processes, as seen at the start and by the temp dir all of them name.
        for p in psutil.process_iter(["cmdline"]):
            if any(temp in arg for arg in p.info["cmdline"] or ()) and p.pid not in {q.pid for q in processes}:
                processes.append(p)
        for p in processes:
            try:
                p.wait(10)
            except psutil.TimeoutExpired:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(temp, ignore_errors=True)


@FAULTS
def test_ray_address_with_a_wrong_token(box, token_ray_head):
    """Ray (2.60 here) has token authentication (RAY_AUTH_MODE=token): a client with another token is refused; Ray
    gives up after about 20 s and logs each retry on stderr, which init_ray holds back to say it in one line."""
    address, token = token_ray_head
    start = time.monotonic()
    box.fails("eval", box.model, "--limit", 1, ray=True, seconds=120,
              env={"RAY_ADDRESS": address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong-" + token[6:]},
              fragment=f"cannot join the Ray cluster at RAY_ADDRESS={address}: the cluster refused this process's "
                       "authentication token")
    assert time.monotonic() - start < 60

