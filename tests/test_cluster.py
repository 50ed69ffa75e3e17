"""Offline checks of the KubeRay manifests in cluster/ and the GPU configs they run (no API server, no Ray).

1. Every ray.io document validates against the openAPIV3Schema of its kind and version in
   KubeRay's CRDs (../shared/kuberay-crds). The schema is made strict first, as the API server
   is under `kubectl apply` (field validation Strict): an object with listed properties takes no
   others, unless it says x-kubernetes-preserve-unknown-fields. jsonschema ignores the
   x-kubernetes-* keywords (CEL rules are not evaluated) and formats (int32, int-or-string).
2. What a schema cannot say: a RayJob's entrypoint is one `selfimprove run` of a config in
   configs/ that loads with its overrides; its run_dir is on a volume every pod shares; the
   cluster has the CPUs and GPUs the config asks Ray for; images and spec.rayVersion pin
   setup.cfg's ray; volumes name the claim of cluster/storage.yaml.
3. Broken manifests fail, so a passing check means something.
"""

from __future__ import annotations

import configparser
import copy
import functools
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from selfimprove.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
# SELFIMPROVE_KUBERAY_CRDS names the folder of KubeRay's CRDs; by default the shared folder beside the repo.
CRDS = Path(os.environ.get("SELFIMPROVE_KUBERAY_CRDS", Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"))
needs_crds = pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay CRDs not found at {CRDS} (set SELFIMPROVE_KUBERAY_CRDS)")

APP = "/app"  # where cluster/Dockerfile puts the repository
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
OTHER_KINDS = {("v1", "PersistentVolumeClaim")}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", "<"}
GPU = "nvidia.com/gpu"


def documents() -> list[tuple[str, dict]]:
    """(file name, document) for every YAML document in cluster/."""
    docs = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def ray_documents() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in documents() if doc.get("kind") in RAY_KINDS]


def manifest(name: str) -> dict:
    (doc,) = [doc for file, doc in documents() if file == name]
    return doc


def cluster_spec(doc: dict) -> dict:
    """The RayCluster spec of a RayCluster, or the one a RayJob or RayService starts."""
    spec = doc["spec"]
    return spec.get("rayClusterSpec", spec)


def containers(doc: dict) -> list[tuple[str, dict, dict]]:
    """(group name, pod spec, container) for the head and every worker group's containers."""
    spec = cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return [(name, g["template"]["spec"], c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def setup_cfg_ray_version() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    (version,) = re.findall(r"^ray\[[^\]]*\]==(\S+)$", cfg["options"]["install_requires"], re.M)
    return version


def cpus(quantity) -> float:
    """A Kubernetes CPU quantity ("2", 2, "500m") in cores."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


# ---------------------------------------------------------------------------------------------
# Schema validation


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict:
    """The openAPIV3Schema that KubeRay's CRD for `kind` gives `api_version` (e.g. ray.io/v1)."""
    group, _, version = api_version.partition("/")
    path = CRDS / f"{group}_{kind.lower()}s.yaml"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind, path
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served["served"], f"{kind} {api_version} is not served"
    return strict(served["schema"]["openAPIV3Schema"])


def strict(schema):
    """A copy of `schema` in which objects with listed properties reject unlisted ones."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def schema_errors(doc: dict) -> list[str]:
    """Every place `doc` breaks its CRD's schema, as 'path: message'."""
    import jsonschema

    validator = jsonschema.Draft7Validator(crd_schema(doc["apiVersion"], doc["kind"]))
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc))


def test_cluster_folder_holds_the_expected_manifests():
    names = {name for name, _ in documents()}
    assert {"raycluster-cpu.yaml", "rayjob-local.yaml", "rayjob-gpu.yaml", "storage.yaml"} <= names
    for name, doc in documents():
        known = doc.get("kind") in RAY_KINDS and doc.get("apiVersion") == "ray.io/v1"
        assert known or (doc.get("apiVersion"), doc.get("kind")) in OTHER_KINDS, f"{name}: unexpected {doc.get('kind')}"


@needs_crds
@pytest.mark.parametrize("name,doc", ray_documents(), ids=[name for name, _ in ray_documents()])
def test_manifest_validates_against_kuberay_crd(name, doc):
    assert schema_errors(doc) == []


def _break_replicas(doc):
    cluster_spec(doc)["workerGroupSpecs"][0]["replicas"] = "two"


def _break_start_param(doc):
    cluster_spec(doc)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be the string "0"


def _misspell_key(doc):
    spec = cluster_spec(doc)
    spec["workerGroupSpec"] = spec.pop("workerGroupSpecs")


def _drop_head(doc):
    del cluster_spec(doc)["headGroupSpec"]


def _break_auth_mode(doc):
    cluster_spec(doc)["authOptions"]["mode"] = "password"


@needs_crds
@pytest.mark.parametrize("name", ["raycluster-cpu.yaml", "rayjob-local.yaml"])
@pytest.mark.parametrize("breakage,where", [
    (_break_replicas, "workerGroupSpecs.0.replicas: 'two' is not of type 'integer'"),
    (_break_start_param, "headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'"),
    (_misspell_key, "'workerGroupSpec' was unexpected"),
    (_drop_head, "'headGroupSpec' is a required property"),
    (_break_auth_mode, "authOptions.mode: 'password' is not one of ['disabled', 'token']"),
])
def test_schema_check_rejects_a_broken_manifest(name, breakage, where):
    doc = copy.deepcopy(manifest(name))
    breakage(doc)
    errors = schema_errors(doc)
    assert any(where in e for e in errors), errors


# ---------------------------------------------------------------------------------------------
# What the schema cannot check


def jobs() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in ray_documents() if doc["kind"] == "RayJob"]


def entrypoint(doc: dict) -> tuple[Path, list[str]]:
    """The repository config and overrides a RayJob's `selfimprove run` entrypoint names."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert not SHELL_OPERATORS & set(argv), "KubeRay runs what follows a shell operator in the submitter pod"
    assert argv[:2] == ["selfimprove", "run"], argv
    config, overrides = argv[2], argv[3:]
    assert config.startswith(APP + "/"), f"{config} is not in the image's copy of the repository ({APP})"
    return REPO / config.removeprefix(APP + "/"), overrides


@pytest.mark.parametrize("name,doc", jobs(), ids=[name for name, _ in jobs()])
def test_job_runs_a_repository_config_that_loads(name, doc):
    path, overrides = entrypoint(doc)
    assert path.parent == REPO / "configs" and path.is_file(), path
    load_config(path, overrides)


@pytest.mark.parametrize("name,doc", jobs(), ids=[name for name, _ in jobs()])
def test_job_run_dir_is_on_a_volume_every_pod_mounts(name, doc):
    path, overrides = entrypoint(doc)
    run_dir = Path(load_config(path, overrides).run_dir)
    assert run_dir.is_absolute(), f"{name}: run_dir {run_dir} depends on the driver's working directory"
    shared = None
    for group, pod, container in containers(doc):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        mounts = {(m["mountPath"], claims.get(m["name"])) for m in container.get("volumeMounts", [])
                  if run_dir.is_relative_to(m["mountPath"]) and m["name"] in claims}
        assert len(mounts) == 1, f"{name}: {group} does not mount a claim holding {run_dir}"
        assert shared in (None, *mounts), f"{name}: {group} mounts {mounts}, others {shared}"
        (shared,) = mounts


@pytest.mark.parametrize("name,doc", jobs(), ids=[name for name, _ in jobs()])
def test_job_cluster_has_the_cpus_and_gpus_its_config_asks_for(name, doc):
    """Ray waits forever for resources no pod has: check the worker pods against the config's demands."""
    path, overrides = entrypoint(doc)
    cfg = load_config(path, overrides)
    spec = cluster_spec(doc)
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "the head should run the driver only"
    workers = [(g["replicas"], c["resources"]["limits"]) for g in spec["workerGroupSpecs"]
               for c in g["template"]["spec"]["containers"]]
    total_cpus = sum(n * cpus(limits["cpu"]) for n, limits in workers)
    total_gpus = sum(n * int(limits.get(GPU, 0)) for n, limits in workers)
    if total_gpus:
        engines = cfg.rollout.num_actors * cfg.rollout.tensor_parallel_size
        assert total_gpus >= engines, f"{name}: {total_gpus} GPUs for rollout engines needing {engines}"
        assert total_gpus >= cfg.train.num_workers, f"{name}: {total_gpus} GPUs for {cfg.train.num_workers} train workers"
        need = max(cfg.rollout.num_actors, cfg.train.num_workers * max(cfg.train.cpus_per_worker, 1))
        assert total_cpus >= need, f"{name}: {total_cpus} worker CPUs, {need} needed"
    else:
        # 0 means "the largest node's CPUs / count" (selfimprove.runtime.node_cpus): at least 1 each.
        for what, need in (("rollout engines", cfg.rollout.num_actors * (cfg.rollout.cpus_per_actor or 1)),
                           ("train workers", cfg.train.num_workers * (cfg.train.cpus_per_worker or 1))):
            assert total_cpus >= need, f"{name}: {total_cpus} worker CPUs for {what} needing {need}"


def test_gpu_job_worker_group_requests_gpus():
    doc = manifest("rayjob-gpu.yaml")
    for group, _, container in containers(doc):
        resources = container["resources"]
        gpus = int(resources.get("limits", {}).get(GPU, 0))
        if group == "head":
            assert gpus == 0, "the head runs the driver only"
            continue
        assert gpus >= 1, f"worker group {group} requests no {GPU}"
        # Extended resources cannot be overcommitted: a request, if given, must equal the limit.
        assert int(resources.get("requests", {}).get(GPU, gpus)) == gpus
        assert container["image"].endswith("-gpu"), f"{container['image']}: GPU pods need the CUDA image"


def test_images_and_ray_version_pin_setup_cfg_ray():
    version = setup_cfg_ray_version()
    pinned = re.compile(rf"(?<![\d.]){re.escape(version)}(?![\d.])")
    for name, doc in ray_documents():
        assert cluster_spec(doc)["rayVersion"] == version, name
        for group, _, container in containers(doc):
            assert pinned.search(container["image"].rpartition(":")[2]), f"{name} {group}: {container['image']} is not Ray {version}"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(version)}$", dockerfile, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-", dockerfile, re.M)
    assert re.search(rf"^WORKDIR {APP}$", dockerfile, re.M) and re.search(rf"^COPY .* \. {APP}$", dockerfile, re.M)


def test_volume_claims_are_defined_in_storage_yaml():
    defined = {doc["metadata"]["name"] for name, doc in documents() if doc["kind"] == "PersistentVolumeClaim"}
    for name, doc in ray_documents():
        for group, pod, _ in containers(doc):
            for volume in pod.get("volumes", []):
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in defined, f"{name} {group}"


def test_local_job_runs_on_the_cpu_cluster_shape():
    """rayjob-local.yaml starts the cluster raycluster-cpu.yaml describes: keep the two from drifting apart."""
    assert cluster_spec(manifest("rayjob-local.yaml")) == manifest("raycluster-cpu.yaml")["spec"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("gpu-*.yaml")), ids=lambda p: p.name)
def test_gpu_config_loads_and_fits(path):
    assert "NOT RUN ON A GPU BY US" in path.read_text()
    cfg = load_config(path)
    assert cfg.model.startswith("Qwen/") and cfg.task.name == "gsm8k" and cfg.train.precision == "bf16"
    assert cfg.rollout.max_model_len > cfg.rollout.max_tokens and cfg.train.max_len > cfg.rollout.max_tokens
