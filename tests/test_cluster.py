"""Offline checks of the KubeRay manifests in cluster/ and the GPU configs they run (no API server, no Ray).

1. Every ray.io document validates against the openAPIV3Schema of its kind and version in
   KubeRay's CRDs (../shared/kuberay-crds). The schema is made strict first, as the API server
   is under `kubectl apply` (field validation Strict): an object with listed properties takes no
   others, unless it says x-kubernetes-preserve-unknown-fields. jsonschema ignores the
   x-kubernetes-* keywords (CEL rules are not evaluated) and formats (int32, int-or-string).
2. What a schema cannot say: a RayJob's entrypoint is one `selfimprove run` of a config in
   configs/ that loads with its overrides; its run_dir is on a volume of the head alone (where the driver
   runs) and its storage_path on a volume every pod mounts at the same path (nodes share nothing else); the
   cluster has the CPUs and GPUs the config asks Ray for; images and spec.rayVersion pin
   setup.cfg's ray; volumes name the claim of cluster/storage.yaml.
3. Security (issue 13): every pod runs as the image's non-root user with no privileges, no
   service-account token, a RuntimeDefault seccomp profile; heads expose no Ray Client port; jobs
   have a deadline; cluster/networkpolicy.yaml lets only the cluster's own pods reach its head,
   and submitters (and, for jobs, the KubeRay operator) its dashboard. There is no schema for
   NetworkPolicy here: the policies are evaluated against the labels KubeRay gives each pod.
4. Serving: the RayService's serveConfigV2 is what selfimprove.serve.serve_config makes for the
   last model of rayjob-local.yaml's run, passes Ray Serve's own schema, and reads the model from
   the volume the job writes; its API key comes from a Secret; its head adds Serve's HTTP port,
   open to the namespace's pods and the operator only.
5. Broken manifests fail, so a passing check means something.
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

from selfimprove.api_key import KEY_ENV
from selfimprove.config import Config
from selfimprove.recipes import load_config
from selfimprove.serve import Served, serve_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
# SELFIMPROVE_KUBERAY_CRDS names the folder of KubeRay's CRDs; by default the shared folder beside the repo.
CRDS = Path(os.environ.get("SELFIMPROVE_KUBERAY_CRDS", Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"))
needs_crds = pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay CRDs not found at {CRDS} (set SELFIMPROVE_KUBERAY_CRDS)")

APP = "/app"  # where cluster/Dockerfile puts the repository
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}
OTHER_KINDS = {("v1", "PersistentVolumeClaim"), ("networking.k8s.io/v1", "NetworkPolicy")}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", "<"}
GPU = "nvidia.com/gpu"
CLUSTER_LABEL = "selfimprove/cluster"  # on a RayJob's pods: KubeRay names its cluster <job>-<random>


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


CLUSTER_SPEC_KEYS = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}  # KubeRay's names for it


def cluster_spec(doc: dict) -> dict:
    """The RayCluster spec of a RayCluster, or the one a RayJob or RayService starts."""
    spec = doc["spec"]
    return spec[CLUSTER_SPEC_KEYS[doc["kind"]]] if doc["kind"] in CLUSTER_SPEC_KEYS else spec


def containers(doc: dict) -> list[tuple[str, dict, dict]]:
    """(group name, pod spec, container) for the head and every worker group's containers."""
    spec = cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return [(name, g["template"]["spec"], c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(group name, pod template) for the head, every worker group and a RayJob's submitter pod."""
    spec = cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    templates = [(name, g["template"]) for name, g in groups]
    if "submitterPodTemplate" in doc["spec"]:
        templates.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    return templates


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
    assert {"raycluster-cpu.yaml", "rayjob-local.yaml", "rayjob-gpu.yaml", "rayservice-cpu.yaml", "storage.yaml",
            "networkpolicy.yaml"} <= names
    assert manifest("rayservice-cpu.yaml")["kind"] == "RayService"
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
@pytest.mark.parametrize("name", ["raycluster-cpu.yaml", "rayjob-local.yaml", "rayservice-cpu.yaml"])
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
def test_job_shares_only_storage_path_between_pods(name, doc):
    """The run dir is the driver's, on the head; workers mount only the claim of storage_path, at the same path."""
    path, overrides = entrypoint(doc)
    cfg = load_config(path, overrides)
    run_dir = Path(cfg.run_dir)
    assert run_dir.is_absolute(), f"{name}: run_dir {run_dir} depends on the driver's working directory"
    _, runs = shared_mount(name, doc, run_dir, groups={"head"})
    assert cfg.storage_path and Path(cfg.storage_path).is_absolute(), f"{name}: storage_path {cfg.storage_path}"
    _, storage = shared_mount(name, doc, Path(cfg.storage_path))
    for group, pod, _ in containers(doc):
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        assert group == "head" or claims == {storage}, f"{name}: {group} mounts {claims}, not only {storage}"
    assert runs != storage


def shared_mount(name: str, doc: dict, path: Path, groups: set[str] | None = None) -> tuple[str, str]:
    """(mount path, claim) of the claim holding `path` that every Ray container of `doc` (of `groups`, if given)
    mounts, at the same place."""
    shared = None
    for group, pod, container in containers(doc):
        if groups is not None and group not in groups:
            continue
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        mounts = {(m["mountPath"], claims.get(m["name"])) for m in container.get("volumeMounts", [])
                  if path.is_relative_to(m["mountPath"]) and m["name"] in claims}
        assert len(mounts) == 1, f"{name}: {group} does not mount a claim holding {path}"
        assert shared in (None, *mounts), f"{name}: {group} mounts {mounts}, others {shared}"
        (shared,) = mounts
    return shared


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
    """rayjob-local.yaml starts the cluster raycluster-cpu.yaml describes: keep the two from drifting apart.

    Only the job's pods carry CLUSTER_LABEL (a RayCluster's pods are told apart by KubeRay's ray.io/cluster)."""
    spec = copy.deepcopy(cluster_spec(manifest("rayjob-local.yaml")))
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert group["template"].pop("metadata") == {"labels": {CLUSTER_LABEL: "selfimprove-local"}}
    assert spec == manifest("raycluster-cpu.yaml")["spec"]


# The GPU recipes; gpu-smoke.yaml (the bundled model on one GPU) is checked by tests/test_gpu_smoke.py.
@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").glob("gpu-*.yaml") if p.name != "gpu-smoke.yaml"),
                         ids=lambda p: p.name)
def test_gpu_config_loads_and_fits(path):
    assert "NOT RUN ON A GPU BY US" in path.read_text()
    cfg = load_config(path)
    assert cfg.model.startswith("Qwen/") and cfg.task.name in ("gsm8k", "mbpp") and cfg.train.precision == "bf16"
    assert cfg.rollout.max_model_len > cfg.rollout.max_tokens and cfg.train.max_len > cfg.rollout.max_tokens


# ---------------------------------------------------------------------------------------------
# Security (issue 13)

RAY_UID, RAY_GID = 1000, 100  # the base image's `ray` user and its `users` group
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "seccompProfile": {"type": "RuntimeDefault"}}
VOLUME_OWNERSHIP = {"fsGroup": RAY_GID, "fsGroupChangePolicy": "OnRootMismatch"}  # pods with volumes only
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
HEAD_PORTS = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"}]
GCS, DASHBOARD, RAY_CLIENT, SERVE = 6379, 8265, 10001, 8000
# KubeRay builds a RayService's <name>-serve-svc from the head port named "serve" (and refuses to without one).
SERVE_PORT = {"containerPort": SERVE, "name": "serve"}
DEADLINES = {"rayjob-local.yaml": 4 * 3600, "rayjob-gpu.yaml": 24 * 3600}
SUBMITTER = {"selfimprove/submitter": "true"}
# The operator's pod labels as its Helm chart and its kustomize install set them.
OPERATORS = [{"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
              "app.kubernetes.io/component": "kuberay-operator"},
             {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"}]


def pods() -> list[tuple[str, dict, str, dict]]:
    """(file name, Ray document, group name, pod template) for every pod the Ray documents start."""
    return [(name, doc, group, template) for name, doc in ray_documents() for group, template in pod_templates(doc)]


def pod_ids(items) -> list[str]:
    return [f"{item[0]}:{item[2]}" for item in items]


@pytest.mark.parametrize("name,doc,group,template", pods(), ids=pod_ids(pods()))
def test_pod_runs_as_the_image_user_without_privileges(name, doc, group, template):
    spec = template["spec"]
    expected = POD_SECURITY | (VOLUME_OWNERSHIP if spec.get("volumes") else {})
    assert spec["securityContext"] == expected
    for container in spec["containers"] + spec.get("initContainers", []):
        assert container["securityContext"] == CONTAINER_SECURITY, container["name"]
    assert spec["automountServiceAccountToken"] is False, "Ray needs no Kubernetes API access here"


def test_image_runs_as_the_pods_user_without_sudo():
    """The pods' runAsUser/runAsGroup are the image's user, which the base image lets sudo without a password."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert users[-1] == f"{RAY_UID}:{RAY_GID}", users
    assert "sed -i '/^ray ALL=NOPASSWD: ALL$/d' /etc/sudoers" in dockerfile
    assert "! grep -rqs '^[^#]*NOPASSWD' /etc/sudoers /etc/sudoers.d" in dockerfile


@pytest.mark.parametrize("name,doc", ray_documents(), ids=[name for name, _ in ray_documents()])
def test_head_exposes_gcs_and_dashboard_only(name, doc):
    """KubeRay builds the head Service from these ports: no Ray Client port (10001).

    A RayService's head also lists Serve's HTTP port: its clients' requests come in there (through the serve Service
    KubeRay builds from it), which is the point of a RayService; no other kind may list it."""
    head_ports = HEAD_PORTS + ([SERVE_PORT] if doc["kind"] == "RayService" else [])
    for group, _, container in containers(doc):
        assert container.get("ports", []) == (head_ports if group == "head" else []), f"{name} {group}"


def test_nothing_connects_with_ray_client():
    """The Ray Client port is closed (test_head_exposes_gcs_and_dashboard_only): a ray:// address would hang."""
    scheme = "ray" + "://"
    sources = [*(REPO / "selfimprove").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py"), *(REPO / "configs").glob("*.yaml")]
    assert len(sources) > 10
    assert [str(path) for path in sources if scheme in path.read_text()] == []
    assert [name for name, doc in jobs() if scheme in doc["spec"]["entrypoint"]] == []


def test_every_job_has_a_deadline_and_is_cleaned_up():
    assert {name for name, _ in jobs()} == set(DEADLINES)
    for name, doc in jobs():
        spec = doc["spec"]
        assert (spec["activeDeadlineSeconds"], spec["shutdownAfterJobFinishes"], spec["ttlSecondsAfterFinished"]) == (
            DEADLINES[name], True, 600), name


@pytest.mark.parametrize("name,doc", jobs(), ids=[name for name, _ in jobs()])
def test_job_submitter_is_labelled_and_runs_the_head_image(name, doc):
    template = doc["spec"]["submitterPodTemplate"]
    assert template["metadata"] == {"labels": SUBMITTER}
    (container,) = template["spec"]["containers"]
    (head,) = cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["containers"]
    assert container["image"] == head["image"], "the submitter's ray CLI must be the cluster's ray"
    assert "command" not in container and "args" not in container, "KubeRay writes the submit command"
    assert template["spec"]["restartPolicy"] == "Never"


# NetworkPolicy: no schema here, so the policies are evaluated, as a network plugin would, against
# the labels KubeRay gives each pod.


def policies() -> list[dict]:
    return [doc for _, doc in documents() if doc["kind"] == "NetworkPolicy"]


def kuberay_labels(doc: dict, group: str, template: dict) -> dict:
    """The labels KubeRay puts on a pod of `group` (common/pod.go labelPod; rayjob_controller.go for the submitter)."""
    labels = dict(template.get("metadata", {}).get("labels", {}))
    name = doc["metadata"]["name"]
    if group == "submitter":
        return labels | {"ray.io/originated-from-cr-name": name, "ray.io/originated-from-crd": "RayJob",
                         "app.kubernetes.io/created-by": "kuberay-operator"}
    cluster = name if doc["kind"] == "RayCluster" else f"{name}-x7k2q"  # a job's cluster gets a random suffix
    return labels | {"ray.io/cluster": cluster, "ray.io/node-type": "head" if group == "head" else "worker",
                     "ray.io/group": "headgroup" if group == "head" else group, "ray.io/is-ray-node": "yes",
                     "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is evaluated here: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def reaches(policy: dict, labels: dict, port: int, same_namespace: bool = True) -> bool:
    """Whether a pod with `labels` may open TCP `port` on a pod `policy` selects."""
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports is not None and not any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in ports):
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            assert set(peer) <= {"podSelector", "namespaceSelector"}, peer
            namespace_ok = peer["namespaceSelector"] == {} if "namespaceSelector" in peer else same_namespace
            if namespace_ok and selects(peer.get("podSelector", {}), labels):
                return True
    return False


def head_policy(head_labels: dict) -> dict:
    """The one policy selecting the head with these labels."""
    (policy,) = [p for p in policies() if selects(p["spec"]["podSelector"], head_labels)]
    return policy


def pod_labels(doc: dict) -> dict[str, dict]:
    return {group: kuberay_labels(doc, group, template) for group, template in pod_templates(doc)}


def test_network_policies_are_ingress_policies_on_heads_only():
    all_pods = {(name, group): labels for name, doc in ray_documents() for group, labels in pod_labels(doc).items()}
    assert len(policies()) == len(ray_documents())
    for policy in policies():
        assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["spec"]["policyTypes"] == ["Ingress"]
        selected = [pod for pod, labels in all_pods.items() if selects(policy["spec"]["podSelector"], labels)]
        assert len(selected) == 1 and selected[0][1] == "head", (policy["metadata"]["name"], selected)


@pytest.mark.parametrize("name,doc", ray_documents(), ids=[name for name, _ in ray_documents()])
def test_network_policy_lets_the_cluster_in_and_submitters_to_the_dashboard(name, doc):
    labels = pod_labels(doc)
    policy = head_policy(labels["head"])
    assert policy["metadata"]["name"] == f"{doc['metadata']['name']}-head"
    is_job, is_service = doc["kind"] == "RayJob", doc["kind"] == "RayService"
    # A RayService's head differs on purpose: its Serve port is for clients, any pod of the namespace (the gateway
    # wants the API key), and for the operator, which deploys and watches Serve through the dashboard and checks
    # the proxy's health on the Serve port. No job is submitted to it: its dashboard is closed to submitters.
    clients = {SERVE} if is_service else set()
    submitters = set() if is_service else {DASHBOARD}
    operator_ports = {DASHBOARD, SERVE} if is_service else {DASHBOARD} if is_job else set()
    # (who, labels, same namespace, the ports it may open on the head out of GCS, dashboard, Ray Client, Serve)
    expected = [(f"own {group}", pod, True, {DASHBOARD} if group == "submitter" else {GCS, DASHBOARD, RAY_CLIENT, SERVE})
                for group, pod in labels.items()]
    expected += [(f"{other} {group}", pod, True, (submitters if group == "submitter" else set()) | clients)
                 for other, other_doc in ray_documents() if other != name for group, pod in pod_labels(other_doc).items()]
    expected += [("your submitter", SUBMITTER | {"app": "mine"}, True, submitters | clients),
                 ("a submitter in another namespace", SUBMITTER, False, set()),
                 ("an unlabelled pod", {"app": "mine"}, True, clients),
                 ("an unlabelled pod in another namespace", {"app": "mine"}, False, set())]
    expected += [("the KubeRay operator", operator, False, operator_ports) for operator in OPERATORS]
    for who, pod, same_namespace, ports in expected:
        got = {port for port in (GCS, DASHBOARD, RAY_CLIENT, SERVE) if reaches(policy, pod, port, same_namespace)}
        assert got == ports, f"{name}: {who} {pod} reaches {got}"
    (head,) = [c for g, _, c in containers(doc) if g == "head"]
    assert {"containerPort": DASHBOARD, "name": "dashboard"} in head["ports"]


def test_network_policy_check_notices_a_wrong_policy():
    """A job policy on ray.io/cluster selects nothing (KubeRay suffixes the name); one without ports opens 10001."""
    labels = pod_labels(manifest("rayjob-local.yaml"))
    policy = copy.deepcopy(head_policy(labels["head"]))
    policy["spec"]["podSelector"]["matchLabels"] = {"ray.io/cluster": "selfimprove-local", "ray.io/node-type": "head"}
    assert not selects(policy["spec"]["podSelector"], labels["head"])
    policy = copy.deepcopy(head_policy(labels["head"]))
    assert not reaches(policy, labels["submitter"], RAY_CLIENT)
    del policy["spec"]["ingress"][1]["ports"]
    assert reaches(policy, labels["submitter"], RAY_CLIENT)


# ---------------------------------------------------------------------------------------------
# Serving: cluster/rayservice-cpu.yaml serves the last model of rayjob-local.yaml's run

SERVICE, SERVED_JOB = "rayservice-cpu.yaml", "rayjob-local.yaml"
SERVED_NAME = "local"  # what `selfimprove serve` names a run folder's model: the folder's name
# `selfimprove serve <run_dir> --host 0.0.0.0 --emit-config FILE rollout.dtype=float32`: the proxy answers from
# outside its pod; the run's rollout.dtype is `auto`, which --emit-config resolves on the machine writing the file,
# and the pods' CPUs are unknown here: float32 is native on every CPU. Serve's other settings are the defaults.
SERVE_OVERRIDES = ["serve.host=0.0.0.0", "rollout.dtype=float32"]
API_KEY_SECRET = {"name": "selfimprove-serve", "key": "api-key"}  # cluster/README.md creates it


def served_run() -> tuple[Config, Served]:
    """The job's config with SERVE_OVERRIDES, and what `selfimprove serve` serves of its finished run: the model
    its last iteration trained and evaluated (selfimprove.recipes.loop), in the job's run_dir."""
    path, overrides = entrypoint(manifest(SERVED_JOB))
    cfg = load_config(path, overrides + SERVE_OVERRIDES)
    t = cfg.iterations
    model = str(Path(cfg.run_dir) / f"iter_{t}" / "train" / "model")
    return cfg, Served(SERVED_NAME, {"model": (model, f"{SERVED_NAME}@iter_{t}")}, t)


def serve_config_v2(doc: dict) -> dict:
    text = doc["spec"]["serveConfigV2"]
    assert isinstance(text, str), "KubeRay takes serveConfigV2 as a YAML string (a block: `serveConfigV2: |`)"
    return yaml.safe_load(text)


def test_service_serves_what_selfimprove_serve_would_for_the_jobs_run(monkeypatch):
    """serveConfigV2 is serve_config's output for the job's run: the two cannot drift apart. Its engines preload
    the tcmalloc cluster/Dockerfile installs, whether or not this machine has it."""
    import selfimprove.rollout.engine

    assert "libtcmalloc-minimal4" in (CLUSTER / "Dockerfile").read_text()
    monkeypatch.setattr(selfimprove.rollout.engine, "cpu_engine_env", lambda: {"LD_PRELOAD": "libtcmalloc_minimal.so.4"})
    cfg, served = served_run()
    assert serve_config_v2(manifest(SERVICE)) == serve_config(served, cfg, cpu=True, key_sha256=None)


def test_service_reads_the_model_from_the_volume_the_job_writes():
    """The engine's model and the gateway's tokenizer are on the claim the job's run writes, mounted alike in every pod."""
    cfg, served = served_run()
    service, job = manifest(SERVICE), manifest(SERVED_JOB)
    (model, _), = served.models.values()
    gateway, engine = serve_config_v2(service)["applications"]
    paths = {gateway["args"]["tokenizer"], engine["args"]["llm_config"]["model_loading_config"]["model_source"]}
    assert paths == {model} and Path(model).is_relative_to(cfg.run_dir)
    assert shared_mount(SERVICE, service, Path(model)) == shared_mount(SERVED_JOB, job, Path(cfg.run_dir), {"head"})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray 2.60's pydantic models, when ray.serve.schema loads
def test_service_serve_config_passes_rays_schema():
    """Ray Serve's own schema (what `serve deploy` and the dashboard KubeRay sends it to check), and the proxy
    listens on the head's serve port, on every interface of the pod."""
    from ray.serve.schema import ServeDeploySchema

    doc = manifest(SERVICE)
    schema = ServeDeploySchema.model_validate(serve_config_v2(doc))
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", SERVE)
    (head,) = [c for group, _, c in containers(doc) if group == "head"]
    assert SERVE_PORT in head["ports"]
    assert [(a.name, a.route_prefix, a.import_path) for a in schema.applications] == [
        (SERVED_NAME, "/", "selfimprove.gateway:gateway_app"),
        (f"{SERVED_NAME}-model-0", None, "selfimprove.model_server:model_app")]
    # The schema does check something: two applications at one route, or an import path without its module.
    for key, value in (("route_prefix", "/"), ("import_path", "model_app")):
        broken = serve_config_v2(doc)
        broken["applications"][1][key] = value
        with pytest.raises(ValueError):  # pydantic's ValidationError
            ServeDeploySchema.model_validate(broken)


def test_service_api_key_comes_from_a_secret_in_every_ray_container():
    """The gateway hashes SELFIMPROVE_API_KEY where Serve builds it (key_sha256 null), on any node: every Ray
    container gets it from the Secret, never as a literal, and not optional (no Secret: no pod, not an open server)."""
    doc = manifest(SERVICE)
    text = (CLUSTER / SERVICE).read_text()
    gateway = serve_config_v2(doc)["applications"][0]
    assert gateway["import_path"] == "selfimprove.gateway:gateway_app" and gateway["args"]["key_sha256"] is None
    assert KEY_ENV not in doc["spec"]["serveConfigV2"], "no key, nor its variable, in the Serve config"
    groups = set()
    for group, _, container in containers(doc):
        assert "envFrom" not in container, f"{group}: envFrom"
        env = [e for e in container.get("env", []) if e["name"] == KEY_ENV]
        assert env == [{"name": KEY_ENV, "valueFrom": {"secretKeyRef": API_KEY_SECRET}}], f"{group}: {env}"
        groups.add(group)
    assert groups == {"head", "cpu"}
    assert text.count(f"name: {KEY_ENV}") == len(groups), "the key's variable set elsewhere in the manifest"
    readme = (CLUSTER / "README.md").read_text()
    assert f"kubectl create secret generic {API_KEY_SECRET['name']} --from-literal={API_KEY_SECRET['key']}=" in readme


def test_service_runs_on_the_cpu_cluster_shape():
    """rayservice-cpu.yaml starts the cluster raycluster-cpu.yaml describes, but for what serving adds: the label the
    NetworkPolicy selects (KubeRay names a RayService's cluster <service>-<random>), the API key, the serve port."""
    doc = manifest(SERVICE)
    spec = copy.deepcopy(cluster_spec(doc))
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert group["template"].pop("metadata") == {"labels": {CLUSTER_LABEL: doc["metadata"]["name"]}}
        for container in group["template"]["spec"]["containers"]:
            container.pop("env")  # test_service_api_key_comes_from_a_secret_in_every_ray_container
    spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"].remove(SERVE_PORT)
    # Serve's replicas on the workers read the run's model from the run dir: its volume too.
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]
    worker["containers"][0]["volumeMounts"].remove({"name": "runs", "mountPath": "/mnt/runs"})
    worker["volumes"].remove({"name": "runs", "persistentVolumeClaim": {"claimName": "selfimprove-runs"}})
    assert spec == manifest("raycluster-cpu.yaml")["spec"]


@needs_crds
def test_schema_check_rejects_a_serve_config_that_is_not_a_string():
    doc = copy.deepcopy(manifest(SERVICE))
    doc["spec"]["serveConfigV2"] = serve_config_v2(doc)
    errors = schema_errors(doc)
    assert any(e.startswith("spec.serveConfigV2: ") and "is not of type 'string'" in e for e in errors), errors
