"""`selfimprove serve` without an engine: what it serves from a run folder, the Serve config it writes, the gateway's
token and body checks (in-process ASGI), the choice of application after a promotion, and the command line's
refusals (one line each, before Ray starts)."""

import hashlib

import pytest
import yaml
from cli_helpers import assert_one_line_error, run
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from serving import fake_run

from selfimprove.errors import UserError
from selfimprove.recipes import load_config
from selfimprove.serve import Served, from_run, serve_config

ROOT_MODEL = "smollm2-135m-instruct"


def test_a_run_serves_its_latest_evaluated_model_by_snapshot_name(tmp_path, bundled_model):
    run_dir = fake_run(tmp_path, evaluated=2)
    assert from_run(run_dir, None) == Served("myrun", {"model": (str(run_dir / "iter_1/train/model"), "myrun@iter_1")}, 1)
    assert from_run(run_dir, "mine", iteration=0) == Served("mine", {"model": (bundled_model, "mine@iter_0")}, 0)


def test_a_run_without_the_iteration_asked_for_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"--iteration 2: .* has evaluated iterations 0, 1 only"):
        from_run(fake_run(tmp_path, evaluated=2), None, iteration=2)
    with pytest.raises(UserError, match="no iteration is evaluated yet"):
        from_run(fake_run(tmp_path, evaluated=0, name="new"), None)


def test_serve_config_names_the_builders_and_keeps_only_the_keys_digest(bundled_model):
    cfg = load_config(None, ["serve.max_replicas=3", "serve.num_replicas=1", "serve.cpus_per_replica=2"])
    served = Served("r 1", {"guide": ("/g", "r 1-guide@iter_2"), "solver": (bundled_model, "r 1-solver")}, 2)
    config = serve_config(served, cfg, cpu=True, key_sha256="ab" * 32)
    gateway, guide, solver = config["applications"]
    assert (gateway["name"], gateway["route_prefix"], gateway["import_path"]) == ("r_1", "/", "selfimprove.gateway:gateway_app")
    assert gateway["args"]["routes"] == {"r 1": {"guide": "r_1-guide", "solver": "r_1-solver"}}
    assert gateway["args"]["key_sha256"] == "ab" * 32 and gateway["args"]["tokenizer"] == bundled_model
    assert [guide["name"], solver["name"]] == ["r_1-guide-0", "r_1-solver-0"]
    llm = solver["args"]["llm_config"]
    assert llm["model_loading_config"] == {"model_id": "r 1-solver", "model_source": bundled_model}
    assert llm["placement_group_config"] == {"bundles": [{"CPU": 2}]} and solver["args"]["cores"] == 2
    assert llm["deployment_config"]["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1,
                                                             "max_replicas": 3, "target_ongoing_requests": 8}
    assert "num_replicas" not in llm["deployment_config"]


def test_serve_config_passes_rays_own_schema(bundled_model):
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(Served("m", {"model": (bundled_model, "m")}), load_config(), cpu=True, key_sha256=None)
    apps = ServeDeploySchema.model_validate(config).applications
    assert [(a.name, a.route_prefix, a.import_path) for a in apps] == [
        ("m", "/", "selfimprove.gateway:gateway_app"), ("m-model-0", None, "selfimprove.model_server:model_app")]
    config["applications"][1]["route_prefix"] = "/"  # two applications at one route: Ray's schema refuses it
    with pytest.raises(ValueError, match="route_prefix"):
        ServeDeploySchema.model_validate(config)


def test_newest_running_application_wins():
    from selfimprove.gateway import newest_running

    apps = {"m-model-0": "RUNNING", "m-model-1": "DEPLOYING", "m-model-10": "RUNNING", "m-model-2": "RUNNING",
            "m-model-x": "RUNNING", "mm-model-11": "RUNNING", "m": "RUNNING"}
    assert newest_running("m-model", apps) == "m-model-10"
    assert newest_running("m-model", {"m-model-1": "DEPLOYING"}) is None


@pytest.fixture(scope="module")
def guarded():
    """An app behind the gateway's `Guard` (key "k", 100-byte bodies) that echoes the size of what it read."""
    from selfimprove.gateway import Guard

    app = FastAPI()
    app.add_middleware(Guard, key_sha256=hashlib.sha256(b"k").hexdigest(), max_body=100)

    @app.post("/echo")
    async def echo(request: Request):
        return {"read": len(await request.body())}

    return TestClient(app)


@pytest.mark.parametrize("header", [None, "Bearer x", "Bearer k2", "bearer", "Token k", "Bearer  "])
def test_guard_refuses_a_missing_or_wrong_token(guarded, header):
    r = guarded.post("/echo", content=b"{}", headers={"Authorization": header} if header else {})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_guard_lets_the_right_token_through_in_any_case_of_the_scheme(guarded):
    for scheme in ("Bearer", "bearer"):
        r = guarded.post("/echo", content=b"x" * 100, headers={"Authorization": f"{scheme} k"})
        assert r.status_code == 200 and r.json() == {"read": 100}


def test_guard_refuses_a_body_over_the_limit_declared_or_streamed(guarded):
    r = guarded.post("/echo", content=b"x" * 101, headers={"Authorization": "Bearer k"})
    assert r.status_code == 413 and "100 bytes" in r.json()["error"]["message"]
    chunked = guarded.post("/echo", content=iter([b"x" * 60, b"x" * 60]), headers={"Authorization": "Bearer k"})
    assert chunked.status_code == 413


def test_cli_needs_something_to_serve():
    assert_one_line_error(run("serve"), "give a model or run folder to serve, or --follow RUN_DIR")


def test_cli_refuses_follow_with_an_iteration(tmp_path):
    done = run("serve", "--follow", fake_run(tmp_path, 1), "--iteration", "0")
    assert_one_line_error(done, "--follow promotes each evaluated iteration")


def test_cli_refuses_an_empty_key_and_a_bad_port():
    assert_one_line_error(run("serve", ROOT_MODEL, "--api-key="), "the API key (--api-key) is empty")
    assert_one_line_error(run("serve", ROOT_MODEL, env={"SELFIMPROVE_API_KEY": " "}), "SELFIMPROVE_API_KEY) is empty")
    assert_one_line_error(run("serve", ROOT_MODEL, "--port=70000"), "error: --port must be a port number")


def test_cli_refuses_a_run_with_nothing_evaluated_and_an_iteration_of_a_model(tmp_path):
    assert_one_line_error(run("serve", fake_run(tmp_path, 0)), "no iteration is evaluated yet")
    assert_one_line_error(run("serve", ROOT_MODEL, "--iteration=1"), "is a model, not a run folder")


def test_cli_refuses_more_engines_than_this_machine_holds():
    done = run("serve", ROOT_MODEL, "serve.cpus_per_replica=64")
    assert_one_line_error(done, "serve.cpus_per_replica=64 core(s) = 64, but this machine has")


def test_emitted_config_holds_the_digest_not_the_key(tmp_path, bundled_model):
    out = tmp_path / "serve.yaml"
    done = run("serve", ROOT_MODEL, "--name=smol", f"--emit-config={out}", "--api-key=s3cret")
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "s3cret" not in text
    (gateway, model) = yaml.safe_load(text)["applications"]
    assert gateway["args"]["key_sha256"] == hashlib.sha256(b"s3cret").hexdigest()
    assert model["args"]["llm_config"]["model_loading_config"] == {"model_id": "smol", "model_source": bundled_model}
