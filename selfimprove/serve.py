"""`selfimprove serve`: a run's model, or a guide -> solver pair, behind an OpenAI-compatible Ray Serve endpoint.

1. What is served: a model reference, or a run folder (its latest evaluated model, or iteration N's); an sgft
   run's evaluated models are a guide and its solver, served as one name (`selfimprove.gateway`).
2. Each model runs in a Serve application of its own (`selfimprove.model_server`), named `<name>-<role>-<k>`, with
   the run's engine settings (`rollout.*`) and the replica settings of `serve.*`. The gateway application, named
   `<name>` at `/`, routes requests to the newest running one.
3. Following a run promotes each newly evaluated model: its application `<k+1>` starts beside the old one, the
   gateways move to it, then the old one is deleted, and Serve lets it finish its requests (`serve.drain_seconds`).
   A model whose replicas the cluster has no room for now, or that does not run within `serve.promote_timeout`,
   is not promoted: the old one goes on serving, and one line says why.
4. The same applications, from the same builder arguments, are what `--emit-config` writes as a Serve config file
   (`serve deploy`, or a KubeRay RayService's `serveConfigV2`).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import time
from pathlib import Path

import yaml

from selfimprove.config import Config
from selfimprove.errors import UserError

# Serve logs each replica's start and each request at INFO: what went wrong is enough on a terminal.
QUIET = {"log_level": "WARNING"}
FOLLOW_SECONDS = 5.0  # how often a followed run folder is looked at


@dataclasses.dataclass(frozen=True)
class Served:
    """One public model name: role ("model", or "guide" and "solver") -> (what its engine loads, the model id the
    engine answers as); `iteration` of the run it came from, if any."""

    name: str
    models: dict[str, tuple[str, str]]
    iteration: int | None = None


def what_to_serve(target: str, name: str | None, iteration: int | None = None, guide: str | None = None) -> Served:
    """The models behind `target` (a run folder or a model reference), checked before Ray starts."""
    from selfimprove.models import resolve_model

    folder = Path(target).expanduser()
    if folder.is_dir() and (folder / "config.yaml").is_file():
        if guide:
            raise UserError(f"--guide: {target} is a run folder, whose models are its own; give a model to serve "
                            "with --guide")
        return from_run(folder, name, iteration)
    if iteration is not None:
        raise UserError(f"--iteration {iteration}: {target} is a model, not a run folder")
    name = name or _model_name(target)
    model = resolve_model(target)
    if guide is None:
        return Served(name, {"model": (model, name)})
    return Served(name, {"guide": (resolve_model(guide), f"{name}-guide"), "solver": (model, f"{name}-solver")})


def from_run(run_dir: Path, name: str | None, iteration: int | None = None) -> Served:
    """A run's evaluated model of `iteration` (default: the latest); an sgft run's is a guide with its solver."""
    from selfimprove.driver import evaluated

    done = evaluated(run_dir)
    if not done:
        raise UserError(f"{run_dir}: no iteration is evaluated yet (no finished iter_<t>/eval): nothing to serve")
    chosen = [e for e in done if iteration is None or e.iteration == iteration]
    if not chosen:
        raise UserError(f"--iteration {iteration}: {run_dir} has evaluated iterations "
                        f"{', '.join(str(e.iteration) for e in done)} only")
    e, name = chosen[-1], name or run_dir.resolve().name
    snapshot = f"iter_{e.iteration}"
    if e.guide is None:
        return Served(name, {"model": (e.model, f"{name}@{snapshot}")}, e.iteration)
    return Served(name, {"guide": (e.guide, f"{name}-guide@{snapshot}"), "solver": (e.model, f"{name}-solver")},
                  e.iteration)


def _model_name(ref: str) -> str:
    return Path(ref.rstrip("/")).name.removesuffix(".gguf") or ref


def safe(name: str) -> str:
    """`name` as a Serve application name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def prefix(served: Served, role: str) -> str:
    return f"{safe(served.name)}-{role}"


def loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        return host == "localhost"



def model_args(model: str, model_id: str, cfg: Config, cpu: bool) -> dict:
    """`model_server.model_app`'s arguments: the engine of `cfg.rollout`, replicas of `cfg.serve`."""
    from selfimprove.rollout.engine import cpu_engine_env, engine_args

    r, s = cfg.rollout, cfg.serve
    deployment = {"max_ongoing_requests": s.max_ongoing_requests, "max_queued_requests": s.max_queued_requests,
                  "graceful_shutdown_timeout_s": s.drain_seconds}
    if s.max_replicas is not None and s.max_replicas > s.num_replicas:
        deployment["autoscaling_config"] = {"min_replicas": s.min_replicas, "initial_replicas": s.num_replicas,
                                            "max_replicas": s.max_replicas,
                                            "target_ongoing_requests": s.target_ongoing_requests}
    else:
        deployment["num_replicas"] = s.num_replicas
    config = {"model_loading_config": {"model_id": model_id, "model_source": model},
              "engine_kwargs": engine_args(r, cpu), "deployment_config": deployment}
    if cpu:  # the replica actor itself asks for nothing: its engine's cores are the placement group's bundle
        deployment["ray_actor_options"] = {"num_cpus": 0}
        config.update(accelerator_config={"kind": "cpu"},
                      placement_group_config={"bundles": [{"CPU": s.cpus_per_replica}]},
                      runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(r.cpu_kvcache_gib),
                                                "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", **cpu_engine_env()}})
    return {"llm_config": config, "cores": s.cpus_per_replica if cpu else 0}


def gateway_args(served: Served, cfg: Config, key_sha256: str | None, insecure_no_key: bool = False) -> dict:
    """`gateway.gateway_app`'s arguments; without `key_sha256`, the gateway hashes SELFIMPROVE_API_KEY where it is
    built, and refuses to start without it unless `insecure_no_key`."""
    s = cfg.serve
    limits = {k: getattr(s, k) for k in ("max_tokens", "max_n", "max_request_tokens", "max_prompt_tokens",
                                         "max_body_kb", "request_timeout_s")}
    tokenizer = served.models["solver" if "solver" in served.models else "model"][0]
    return {"routes": {served.name: {role: prefix(served, role) for role in served.models}}, "limits": limits,
            "tokenizer": tokenizer, "guide_max_tokens": cfg.guide.max_tokens, "drain_seconds": s.drain_seconds,
            "key_sha256": key_sha256, "insecure_no_key": insecure_no_key}


def serve_config(served: Served, cfg: Config, cpu: bool, key_sha256: str | None, insecure_no_key: bool = False) -> dict:
    """A Serve config file (`serve deploy`, KubeRay's `serveConfigV2`) for `served`: the same applications and
    arguments `run_server` deploys."""
    apps = [{"name": safe(served.name), "route_prefix": "/", "import_path": "selfimprove.gateway:gateway_app",
             "args": gateway_args(served, cfg, key_sha256, insecure_no_key)}]
    for role, (model, model_id) in served.models.items():
        apps.append({"name": f"{prefix(served, role)}-0", "route_prefix": None,
                     "import_path": "selfimprove.model_server:model_app", "args": model_args(model, model_id, cfg, cpu)})
    return {"http_options": {"host": cfg.serve.host, "port": cfg.serve.port}, "applications": apps}


def write_config(path: Path, config: dict) -> None:
    from selfimprove.io import write_atomic

    head = "# Serve config written by `selfimprove serve --emit-config`: `serve deploy` it, or paste it under a RayService's serveConfigV2\n"
    write_atomic(path, head + yaml.safe_dump(config, sort_keys=False))


def check_fits(served: Served, cfg: Config, follow: bool) -> None:
    """Refuse, before Ray starts, replicas this machine cannot hold when Ray runs on it alone."""
    import os

    from selfimprove.precision import engine_machine

    if os.environ.get("RAY_ADDRESS") or engine_machine().device == "cuda":
        return
    s, cpus = cfg.serve, os.cpu_count() or 1
    engines = len(served.models) * s.num_replicas + (s.num_replicas if follow else 0)
    if engines * s.cpus_per_replica > cpus:
        raise UserError(f"{engines} engine replica(s) x serve.cpus_per_replica={s.cpus_per_replica} core(s)"
                        + (" (following a run starts the new model beside the old)" if follow else "")
                        + f" = {engines * s.cpus_per_replica}, but this machine has {cpus} cores and Ray runs on it "
                        "alone (RAY_ADDRESS is not set): ask for fewer, or run on a Ray cluster")


def run_server(served: Served, cfg: Config, key_sha256: str | None, follow: Path | None = None, say=None) -> None:
    """Deploy `served` on this Ray cluster (or a local one) and serve until interrupted; with `follow`, promote
    each newly evaluated model of that run folder. Interrupting deletes what was deployed, freeing the engines."""
    from ray import serve

    from selfimprove.gateway import gateway_app
    from selfimprove.rollout.stage import cpu_only
    from selfimprove.runtime import init_ray

    say = say or functools.partial(print, flush=True)  # a line as it happens, also into a file or a pipe
    init_ray()
    cpu = cpu_only()
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port}, logging_config=QUIET)
    deployed: dict[str, int] = {}  # application prefix -> k of its running application
    try:
        for role, (model, model_id) in served.models.items():
            deploy_model(prefix(served, role), 0, model_args(model, model_id, cfg, cpu))
            deployed[prefix(served, role)] = 0
        # The command line has refused a reachable host without a key: no key here is meant.
        serve.run(gateway_app(gateway_args(served, cfg, key_sha256, insecure_no_key=key_sha256 is None)),
                  name=safe(served.name), route_prefix="/", logging_config=QUIET)
        say(f"serving {served.name!r} at http://{s.host}:{s.port}/v1 ("
                 + ", ".join(f"{role}: {model}" for role, (model, _) in served.models.items()) + ")")
        while True:
            time.sleep(FOLLOW_SECONDS)
            if follow is not None:
                served = promote_newer(served, follow, cfg, cpu, deployed, say)
    finally:
        serve.shutdown()


def promote_newer(served: Served, run_dir: Path, cfg: Config, cpu: bool, deployed: dict[str, int], say) -> Served:
    """Promote `run_dir`'s latest evaluated model if it is newer than `served`'s; the roles whose model changed get
    a new application, started before the old one is deleted. If the cluster has no room for the new replicas, or
    one does not run within `serve.promote_timeout`, the new ones are deleted and the old ones go on serving."""
    if _latest_eval(run_dir) <= (served.iteration if served.iteration is not None else -1):
        return served
    import ray
    from ray import serve

    from selfimprove.gateway import POLL_SECONDS
    from selfimprove.model_server import replica_resources

    newer = from_run(run_dir, served.name)
    changed = {prefix(served, role): model_args(model, model_id, cfg, cpu)
               for role, (model, model_id) in newer.models.items() if served.models.get(role, (None,))[0] != model}
    started = []
    try:
        check_room([replica_resources(args) for args in changed.values()] * cfg.serve.num_replicas,
                   ray.available_resources())
        for p, args in changed.items():
            deploy_model(p, deployed[p] + 1, args, timeout=cfg.serve.promote_timeout)
            started.append(p)
    except UserError as e:
        for p in started:
            serve.delete(f"{p}-{deployed[p] + 1}", _blocking=False)
        say(f"not promoted to iteration {newer.iteration}, still serving iteration {served.iteration}: {e}")
        return dataclasses.replace(served, iteration=newer.iteration)  # not retried: the run has moved on
    time.sleep(3 * POLL_SECONDS)  # every gateway has looked at Serve's applications since the new ones ran
    for p in started:
        serve.delete(f"{p}-{deployed[p]}", _blocking=False)
        deployed[p] += 1
    say(f"promoted {served.name!r} to iteration {newer.iteration} ("
        + ", ".join(f"{role}: {model}" for role, (model, _) in newer.models.items()) + ")")
    return newer


def check_room(replicas: list[dict[str, float]], free: dict[str, float]) -> None:
    """Refuse `replicas` (the CPU and GPU each holds) that do not fit in what the cluster has `free` now."""
    need = {r: sum(replica.get(r, 0.0) for replica in replicas) for r in ("CPU", "GPU")}
    if any(need[r] > free.get(r, 0.0) for r in need):
        raise UserError(f"its {len(replicas)} replica(s) need {need['CPU']:g} CPU and {need['GPU']:g} GPU, and the "
                        f"cluster has {free.get('CPU', 0.0):g} CPU and {free.get('GPU', 0.0):g} GPU free")


def deploy_model(p: str, k: int, args: dict, timeout: float | None = None) -> None:
    """Start application `<p>-<k>` and return once it runs (its replicas' engines have started), waiting at most
    `timeout` seconds (None: as long as it takes); one that fails or is late is deleted and named in a `UserError`."""
    from ray import serve

    from selfimprove.model_server import model_app

    name = f"{p}-{k}"
    serve.run_many([serve.RunTarget(model_app(args), name=name, route_prefix=None, logging_config=QUIET)],
                   wait_for_applications_running=False)
    try:
        wait_running(lambda: serve.status().applications[name], timeout)
    except UserError as e:
        serve.delete(name, _blocking=False)
        raise UserError(f"model {args['llm_config']['model_loading_config']['model_source']} {e}") from None


def wait_running(status, timeout: float | None) -> None:
    """Return once `status()` (an application's Serve status) is RUNNING; a `UserError` if it fails, or is not
    running after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while (app := status()).status != "RUNNING":
        if app.status == "DEPLOY_FAILED":  # its message ends with the replica's error
            raise UserError(f"did not start: {app.message.strip().rpartition(chr(10))[2][:300]}")
        if deadline is not None and time.monotonic() > deadline:
            raise UserError(f"did not start within serve.promote_timeout={timeout:g} s")
        time.sleep(1.0)


def _latest_eval(run_dir: Path) -> int:
    """The largest t with a finished iter_<t>/eval, or -1: cheap, so a followed run can be looked at often."""
    from selfimprove.io import is_done

    done = [int(p.parent.name.removeprefix("iter_")) for p in run_dir.glob("iter_*/eval")
            if p.parent.name.removeprefix("iter_").isdigit() and is_done(p)]
    return max(done, default=-1)
