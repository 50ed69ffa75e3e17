"""Tiny `selfimprove run`s on a two-node Ray cluster on this machine whose nodes share only `storage_path`, then the
loss of one node mid-rollout.

1. Two nodes of one CPU each: a `ray start --head --block` and a `ray start --block --address=<head>`, both on
   127.0.0.1, each in its own process group with its own --temp-dir (one short parent under /tmp, also the
   nodes' TMPDIR, so that the rollout's CPU-slot locks give the two engines different cores). Token auth as in
   test_ray_job.py. Both nodes and the run have RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, so that Ray keeps to
   127.0.0.1 (see runtime.bind_to_loopback): without it a worker node (and a driver) turns --address=127.0.0.1:<port>
   into this machine's network address, and connects there. With it `ray start --address` refuses to join a
   cluster ("not supported on Windows and OSX"), so the worker node's `ray start` is run by a two-line wrapper
   that lifts that one check (WORKER_START) and nothing else.
2. Only `storage_path` is shared: the worker node runs in a mount namespace of its own (`unshare -m`, as root)
   with an empty tmpfs over the folder holding the run dirs (`driver/`) and another over its model cache
   (`home/cache`), so it sees neither the run dir nor the head's cache, and fetches models from `shared/` into a
   cache of its own. A run with no storage_path, or one the worker node cannot see, is refused in one line.
3. An IRPO run and a SIPF run, each with two engines (pools and MC PRM actors) and two Ray Train workers: the state
   API shows each kind on both nodes; the worker node's cache holds exactly the models it was handed.
4. A further run: the worker node is stopped while the first engine stage is mid-way. The run must then either
   finish on the head alone, or stop in bounded time with one `selfimprove: error:` line naming the cause and
   no stage marked done that is not complete. What happens (Ray 2.60): the lost engine actor is RESTARTING
   with nowhere to go while the head's engine drains the queue; Ray Data then releases the head's engine, the
   lost one is restarted on the head and its batch retried, and the stage finishes whole. The next engine
   stage's pool of two cannot start on one CPU: it fails after rollout.start_timeout (300 s here), in one line.
Teardown stops both nodes' process trees; nothing with the temp dir in its command line is left.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
from processes import MIXED_OUTCOMES, TINY_RUN, free_ports

from selfimprove.io import folder_digest, read_table
from selfimprove.models import home

pytestmark = [pytest.mark.engine, pytest.mark.faults]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("iter_0/eval", "iter_1/rollout", "iter_1/pairs", "iter_1/train", "iter_1/eval")
RUN = ("rollout.num_actors=2", "rollout.cpus_per_actor=1", "train.num_workers=2", "train.cpus_per_worker=1")
ENGINE = ("MapWorker", "VLLMGenerator")  # Ray Data's actor-pool actors: MapWorker(MapBatches(VLLMGenerator))
TRAIN_WORKER = "RayTrainWorker"
LOST_NODE_BOUND = 15 * 60  # seconds a run may take to end once the worker node is gone
START = 300  # rollout.start_timeout of the run that loses a node: an engine pool that cannot start fails after it
# `ray start` with ray.scripts.scripts' own view of ray_constants saying clusters are enabled: its check for a
# worker node passes, while Ray's address resolution (ray._private.services) still sees them disabled.
WORKER_START = """import sys, types
import ray.scripts.scripts as scripts
constants = types.ModuleType("ray_constants")
constants.__dict__.update(vars(scripts.ray_constants))
constants.ENABLE_RAY_CLUSTER = True
scripts.ray_constants = constants
sys.exit(scripts.main())
"""


class Cluster:
    """Two `ray start --block` nodes; `state(path)` reads the state API of the head's dashboard."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="r2n-", dir="/tmp")  # short: Unix socket paths hold < 108 bytes
        root = Path(self.root)
        self.hidden, self.shared, self.home = root / "driver", root / "shared", root / "home"
        for folder in (self.hidden, self.shared, self.home / "cache"):
            folder.mkdir(parents=True)
        # The bundled model (and DeepSpeed's built ops) as `make model` left them; the caches are the test's own.
        for name in ("models", "torch_extensions"):
            if (home() / name).is_dir():
                (self.home / name).symlink_to(home() / name)
        self.token = secrets.token_hex(16)
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "TMPDIR": self.root,
                    "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "600",  # 60 s is too short on a busy machine
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: dict[str, subprocess.Popen] = {}
        self.folders: dict[str, Path] = {}
        self.logs = []

    def start(self, attempts: int = 3) -> None:
        """Start the head, then the worker node. On a loaded machine a node's `ray start` can give up: Ray gives a
        raylet, and the head's client server, 30 s to register (fixed in its code); a head that gives up ends the
        cluster, even after it answered. Then both nodes are stopped and started again, in fresh temp dirs."""
        for attempt in range(attempts):
            if self._try_start(attempt):
                return
            print(f"\nthe cluster did not come up (attempt {attempt + 1}):\n" +
                  "\n".join(f"{n}: {self.log(n, 1500)}" for n in self.nodes))
            for name in ("worker", "head"):
                self.stop(name)
            self.nodes.clear()
        pytest.fail(f"the cluster did not come up in {attempts} attempts")

    def _try_start(self, attempt: int) -> bool:
        self.gcs, self.dashboard_port, head_agent, client, worker_agent = free_ports(5)
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.address = f"127.0.0.1:{self.gcs}"
        if not self._start("head", attempt, [str(BIN / "ray")], self._dashboard_up,
                           "--head", f"--port={self.gcs}", "--dashboard-host=127.0.0.1",
                           f"--dashboard-port={self.dashboard_port}", f"--dashboard-agent-listen-port={head_agent}",
                           f"--ray-client-server-port={client}"):
            return False
        # In a mount namespace of its own: empty tmpfs folders over the run dirs' parent and its cache.
        hide = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs tmpfs "$1" && mount -t tmpfs tmpfs "$2" && shift 2 && exec "$@"', "sh",
                str(self.hidden), str(self.home / "cache")]
        if not self._start("worker", attempt, [*hide, sys.executable, "-c", WORKER_START],
                           lambda: len(self.alive_nodes()) == 2,
                           f"--address={self.address}", f"--dashboard-agent-listen-port={worker_agent}"):
            return False
        time.sleep(40)  # past the 30 s in which a node's processes may still give up
        if any(p.poll() is not None for p in self.nodes.values()) or len(self.alive_nodes()) != 2:
            return False
        nodes = self.alive_nodes()
        self.head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
        self.worker_id = next(n["node_id"] for n in nodes if not n["is_head_node"])
        return True

    def _start(self, name: str, attempt: int, ray: list[str], ready, *args: str, timeout: float = 600) -> bool:
        """Start the node; whether `ready()` came true before it (or the head) gave up."""
        folder = self.folders[name] = Path(self.root) / f"{name[0]}{attempt}"
        folder.mkdir()
        log = open(Path(self.root) / f"{folder.name}.log", "w")
        self.logs.append(log)
        self.nodes[name] = subprocess.Popen(
            [*ray, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             "--num-gpus=0", "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats",
             f"--temp-dir={folder}", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while all(p.poll() is None for p in self.nodes.values()):
            said = self.log(name, 10**6)
            if "timed out during startup" in said or "exited unexpectedly" in said:  # it can hang after
                return False
            assert time.time() < deadline, f"the {name} node did not come up in {timeout} s:\n{said[-3000:]}"
            try:  # the dashboard answers before the head's raylet has registered, or given up
                if "Ray runtime started" in said and ready():
                    return True
            except OSError:
                pass
            time.sleep(1)
        return False

    def log(self, name: str, tail: int = 3000) -> str:
        return (Path(self.root) / f"{self.folders[name].name}.log").read_text(errors="replace")[-tail:]

    def _dashboard_up(self) -> bool:
        self.get("/api/version")
        return True

    def get(self, path: str, **query) -> dict:
        url = f"{self.dashboard}{path}" + (f"?{urllib.parse.urlencode(query, doseq=True)}" if query else "")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=20) as answer:
            return json.loads(answer.read())

    def state(self, kind: str, **filters) -> list[dict]:
        """Rows of the state API's `/api/v0/<kind>`, with `key=value` equality filters."""
        query = {"limit": 10000, "detail": "true", "filter_keys": list(filters),
                 "filter_predicates": ["="] * len(filters), "filter_values": list(filters.values())}
        return self.get(f"/api/v0/{kind}", **query)["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return self.state("nodes", state="ALIVE")

    def processes(self, name: str) -> list[psutil.Process]:
        """The node's `ray start` and its descendants now, with any process whose command line names its temp dir."""
        folder = str(self.folders[name])
        found = {}
        try:
            root = psutil.Process(self.nodes[name].pid)
            found = {p.pid: p for p in [root, *root.children(recursive=True)]}
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter(["cmdline"]):
            if folder in " ".join(p.info["cmdline"] or []):
                found.setdefault(p.pid, p)
        return list(found.values())

    def stop(self, name: str) -> float:
        """SIGTERM the node's `ray start` process group, SIGKILL what is left of its tree after 30 s; returns seconds."""
        started = time.time()
        if name not in self.nodes:
            return 0.0
        tree = self.processes(name)
        proc = self.nodes[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=30)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        proc.wait(timeout=30)
        return time.time() - started

    def close(self) -> None:
        for name in ("worker", "head"):  # the head last: the worker node's processes talk to it
            self.stop(name)
        for log in self.logs:
            log.close()
        left = [p for p in psutil.process_iter(["cmdline"]) if self.root in " ".join(p.info["cmdline"] or [])]
        assert not left, f"processes of the cluster outlived it: {[(p.pid, p.info['cmdline'][:3]) for p in left]}"
        shutil.rmtree(self.root, ignore_errors=True)


    def seen_by_worker(self, path: Path) -> list[str]:
        """What the worker node's processes see in the folder `path` (through its `ray start`'s view of the files)."""
        return sorted(os.listdir(f"/proc/{self.nodes['worker'].pid}/root{path}"))


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("hiding the run dir from the worker node takes a mount namespace: root and unshare")
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.close()


def start_run(cluster: Cluster, config: Path, run_dir: Path, log: Path, *overrides: str) -> subprocess.Popen:
    """`selfimprove run` joining the cluster through RAY_ADDRESS, in its own process group, its output into `log`,
    sharing `cluster.shared` as its storage_path (a later override wins)."""
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "SELFIMPROVE_HOME": str(cluster.home)}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "selfimprove", "run", str(config), f"run_dir={run_dir}", *RUN,
                                 f"storage_path={cluster.shared}", *overrides],
                                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def refused(cluster: Cluster, config: Path, run_dir: Path, log: Path, *overrides: str) -> str:
    """The one error line of a run that must be refused at start, before any stage."""
    proc = start_run(cluster, config, run_dir, log, *overrides)
    try:
        proc.wait(timeout=300)
    finally:
        stop_run(proc)
    out = log.read_text()
    errors = [line for line in out.splitlines() if line.startswith("selfimprove: error:")]
    assert proc.returncode != 0 and len(errors) == 1, out[-3000:]
    assert not list(run_dir.glob("iter_*")), "a stage ran"
    return errors[0]


def run_on_both_nodes(cluster: Cluster, config: Path, run_dir: Path, log: Path, *overrides: str) -> dict[str, set]:
    """Run to the end; the node ids each kind of actor (engine, train) was seen alive on, and the engines' process
    ids by node ("pids")."""
    proc = start_run(cluster, config, run_dir, log, *overrides)
    seen = {"engine": set(), "train": set(), "pids": {}}
    try:
        deadline = time.time() + 1800
        while proc.poll() is None:
            assert time.time() < deadline, f"the run took over 30 min:\n{log.read_text()[-3000:]}"
            try:
                for actor in cluster.state("actors", state="ALIVE"):
                    kind = "engine" if is_engine(actor) else "train" if TRAIN_WORKER in actor["class_name"] else None
                    if kind:
                        seen[kind].add(actor["node_id"])
                    if kind == "engine" and actor.get("pid"):
                        seen["pids"][actor["pid"]] = actor["node_id"]
            except OSError:
                pass
            time.sleep(1)
    finally:
        stop_run(proc)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "Connected to Ray cluster" in out and "Started a local Ray instance" not in out
    both = {cluster.head_id, cluster.worker_id}
    assert seen["engine"] == both, f"engines ran on {seen['engine']}, nodes are {both}"
    assert seen["train"] == both, f"Ray Train workers ran on {seen['train']}, nodes are {both}"
    print(f"\nhead {cluster.head_id}, worker {cluster.worker_id}: engines on {sorted(seen['engine'])}, "
          f"train workers on {sorted(seen['train'])}")
    return seen


def stop_run(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def is_engine(actor: dict) -> bool:
    return any(name in actor["class_name"] for name in ENGINE)


def test_a_cluster_without_a_storage_path_is_refused(cluster, tiny_config):
    run_dir = cluster.hidden / "no-storage"
    line = refused(cluster, tiny_config, run_dir, cluster.hidden / "no-storage.log", "storage_path=null")
    assert line == ("selfimprove: error: the Ray cluster has 2 nodes and storage_path is not set: set storage_path "
                    "to a folder every node mounts at the same path, or a URI all reach (s3://, gs://)")


def test_a_storage_path_the_worker_node_cannot_see_is_refused(cluster, tiny_config):
    """The driver's own folder as storage: the worker node sees an empty tmpfs there, so not the driver's probe."""
    storage, run_dir = cluster.hidden / "store", cluster.hidden / "unseen"
    line = refused(cluster, tiny_config, run_dir, cluster.hidden / "unseen.log", f"storage_path={storage}")
    prefix = (f"selfimprove: error: node 127.0.0.1 ({cluster.worker_id[:8]}) cannot share files with the driver "
              f"through storage_path={storage}: it does not see {storage}/probes/")
    assert line.startswith(prefix) and line.endswith(
        "/driver, which the driver wrote; storage_path must be a folder every node mounts at the same path, or a URI "
        "every node reaches"), line


def check_shared_only(cluster: Cluster, run_dir: Path, stages: tuple[str, ...], bundled_model: str, seen: dict) -> None:
    """Every stage done; the worker node never saw the run dir, and fetched the models it was handed (the starting
    one and iteration 1's, by digest) into its own cache, which the head's does not share; the training
    checkpoints under storage_path were released once the models were saved; the driver wrote each engine's
    start-up record (an engine that got no batch returns none: which do is up to which is ready first)."""
    for stage in stages:
        assert (run_dir / stage / "_SUCCESS").is_file(), stage
    assert cluster.seen_by_worker(cluster.hidden) == []
    models = {folder_digest(str(Path(bundled_model).resolve())),
              folder_digest(str(run_dir / "iter_1" / "train" / "model"))}
    assert models <= set(cluster.seen_by_worker(cluster.shared / "models"))
    worker_cache = {name for name in cluster.seen_by_worker(cluster.home / "cache" / "models") if "." not in name}
    assert models <= worker_cache, worker_cache  # and an earlier run's of this module
    assert cluster.seen_by_worker(cluster.shared / "checkpoints") == []
    records = [p for p in run_dir.glob("iter_*/*/engines/*.json")]
    pids = {int(p.stem.rsplit("-", 1)[1]) for p in records}
    assert records and pids <= set(seen["pids"]), (records, seen["pids"])
    print(f"engine start-up records from the nodes {sorted({seen['pids'][pid][:8] for pid in pids})}")


def test_a_run_shares_only_storage_path(cluster, tiny_config, bundled_model):
    run_dir = cluster.hidden / "irpo"
    seen = run_on_both_nodes(cluster, tiny_config, run_dir, cluster.hidden / "irpo.log")
    check_shared_only(cluster, run_dir, STAGES, bundled_model, seen)


def test_a_sipf_run_shares_only_storage_path(cluster, tiny_config, bundled_model):
    """MC PRM actors (one per node) and ORPO: the process stage's engines fetch the policy as the pools' do."""
    run_dir = cluster.hidden / "sipf"
    seen = run_on_both_nodes(cluster, tiny_config, run_dir, cluster.hidden / "sipf.log", "recipe=sipf",
                             "process.split=sentence", "process.k=2", "process.max_steps=3", "process.max_tokens=48",
                             "process.eta=0.0", *MIXED_OUTCOMES)  # 1 pair from the default problems at eta 0
    check_shared_only(cluster, run_dir, (*STAGES[:2], "iter_1/process", *STAGES[2:]), bundled_model, seen)


def test_losing_the_worker_node_mid_rollout_is_bounded(cluster, tiny_config, bundled_model):
    """Batches of one prompt, so that each engine has batches in flight and queued when the worker node goes:
    Ray Data writes a stage's Parquet only once every batch is generated, so a written file comes too late."""
    run_dir, log = cluster.hidden / "lose", cluster.hidden / "lose.log"
    proc = start_run(cluster, tiny_config, run_dir, log, "rollout.batch_size=1", f"rollout.start_timeout={START}")
    try:
        deadline = time.time() + 1800
        while True:  # both engines built (an actor is ALIVE once its constructor returned): generating now
            assert proc.poll() is None, f"the run ended before its engines were up:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "no two engines within 30 min"
            try:
                if {a["node_id"] for a in cluster.state("actors", state="ALIVE") if is_engine(a)} == \
                        {cluster.head_id, cluster.worker_id}:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        time.sleep(5)
        # Whichever engine stage both engines are in: a stage can end before the two are seen up together.
        stage = next(s for s in STAGES if (run_dir / f"{s}.partial").is_dir())
        engines = [a for a in cluster.state("actors", state="ALIVE") if is_engine(a)]
        stopping = time.time()
        took = cluster.stop("worker")
        stopped = time.time()
        print(f"\nin {stage}, engines when the worker node was stopped: {[(a['node_id'][:8], a['pid']) for a in engines]}; "
              f"its processes gone in {took:.0f} s")
        try:
            proc.wait(timeout=LOST_NODE_BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run neither finished nor stopped within {LOST_NODE_BOUND} s of the worker node's loss:\n"
                        f"{log.read_text()[-4000:]}")
        ended = time.time()
    finally:
        stop_run(proc)
    out = log.read_text()
    print(f"the run ended with exit {proc.returncode}, {ended - stopped:.0f} s after the worker node was gone "
          f"({stopped - stopping:.0f} s to stop it)")
    done = [s for s in STAGES if (run_dir / s / "_SUCCESS").is_file()]
    for stage in done:  # a finished engine stage holds each of its samples once (each pass: problems x n)
        if (run_dir / stage / "samples").is_dir():
            samples = read_table(run_dir / stage / "samples")
            keys = set(zip(*(samples.column(c).to_pylist() for c in ("pass", "problem_id", "sample_index"))))
            expected = sum(n for n in samples.group_by(["pass", "problem_id"]).aggregate([("n", "max")])
                           .column("n_max").to_pylist())
            # An eval also holds the next rollout's samples, drawn ahead: pass "train", of the training problems.
            per_pass = samples.group_by("pass").aggregate([("problem_id", "count_distinct")]).to_pylist()
            assert {p["pass"]: p["problem_id_count_distinct"] for p in per_pass} == {
                p["pass"]: TINY_RUN["task"]["train_size" if p["pass"] == "train" else "test_size"] for p in per_pass}, stage
            assert len(keys) == samples.num_rows == expected, stage
            print(f"{stage}: {samples.num_rows} samples, each once")
    if proc.returncode == 0:
        assert done == list(STAGES), out[-4000:]
        samples = read_table(run_dir / "iter_1" / "rollout" / "samples")
        assert samples.num_rows == TINY_RUN["task"]["train_size"] * TINY_RUN["rollout"]["n"]
        print("it finished on the head alone")
    else:
        errors = [line for line in out.splitlines() if line.startswith("selfimprove: error:")]
        assert len(errors) == 1, out[-4000:]
        assert errors[0].rsplit(":", 1)[1].strip(), f"the error names no cause: {errors[0]}"
        print(errors[0])
        # Every stage marked done is whole: none is after the one that was running.
        for stage in done:
            assert not (run_dir / f"{stage}.partial").exists(), stage
        if (run_dir / "iter_1" / "rollout" / "_SUCCESS").is_file():
            samples = read_table(run_dir / "iter_1" / "rollout" / "samples")
            assert samples.num_rows == TINY_RUN["task"]["train_size"] * TINY_RUN["rollout"]["n"]
