"""`selfimprove serve` without an engine: what it serves from a run folder, the Serve config it writes, the gateway's
token, body, deadline and request limits (in-process ASGI), the choice of application after a promotion, what a
promotion does when the new model does not fit or start, and the command line's refusals (one line each, before Ray
starts)."""

import asyncio
import dataclasses
import hashlib
from types import SimpleNamespace

import pytest
import yaml
from cli_helpers import assert_one_line_error, run
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from fastapi.testclient import TestClient
from serving import fake_run

from selfimprove.api_key import KEY_ENV
from selfimprove.errors import UserError
from selfimprove.precision import resolve
from selfimprove.recipes import load_config
from selfimprove.serve import Served, check_room, from_run, serve_config, wait_running

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
    """An app behind the gateway's `Guard` (key "k", 100-byte bodies, a 0.2 s deadline) that echoes the size of what
    it read, and routes that never answer, stop answering mid-stream, fail, or find the model's queue full."""
    from ray.serve.exceptions import BackPressureError

    from selfimprove.gateway import Guard, first_of

    app = FastAPI()
    app.add_middleware(Guard, key_sha256=hashlib.sha256(b"k").hexdigest(), max_body=100, timeout_s=0.2)

    @app.post("/echo")
    async def echo(request: Request):
        return {"read": len(await request.body())}

    @app.post("/never")
    async def never():
        await asyncio.Event().wait()

    @app.post("/stalls")
    async def stalls():
        async def events():
            yield "data: {}\n\n"
            await asyncio.Event().wait()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/fails")
    async def fails():
        raise RuntimeError("a bug of ours")

    async def full_queue():  # a handle's stream when the model's queue is full
        raise BackPressureError(num_queued_requests=16, max_queued_requests=16)
        yield

    @app.post("/busy")
    async def busy():
        await first_of(full_queue())

    # What Serve gives an ingress's app (selfimprove.gateway.first_of's reason): a full queue in plain text.
    app.add_exception_handler(BackPressureError, lambda request, e: PlainTextResponse(str(e), status_code=503))

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


def test_a_request_past_its_deadline_gets_a_504(guarded):
    r = guarded.post("/never", headers={"Authorization": "Bearer k"})
    assert r.status_code == 504 and r.json() == {"error": {
        "message": "the request was not answered within this server's limit of 0.2 s", "type": "timeout_error",
        "param": None, "code": "timeout"}}


def test_a_stream_past_its_deadline_ends_with_the_error_as_its_last_event(guarded):
    r = guarded.post("/stalls", headers={"Authorization": "Bearer k"})
    first, last = r.text.strip().split("\n\n")
    assert r.status_code == 200 and first == "data: {}"
    assert last.startswith("data: ") and yaml.safe_load(last.removeprefix("data: "))["error"]["code"] == "timeout"


def test_a_full_queue_and_a_failure_of_ours_are_json_errors(guarded):
    busy = guarded.post("/busy", headers={"Authorization": "Bearer k"})
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "queue_full"
    failed = guarded.post("/fails", headers={"Authorization": "Bearer k"})
    assert failed.status_code == 500 and failed.json()["error"] == {
        "message": "the server failed to answer (RuntimeError); its log has the details", "type": "server_error",
        "param": None, "code": None}


def test_a_body_vllms_request_model_refuses_is_a_400():
    """vLLM refuses over 1,024 prompts with an error of its own, not a validation error: no longer a bare 500."""
    from ray.serve.llm.openai_api_models import CompletionRequest

    from selfimprove.gateway import Guard

    app = FastAPI()
    app.add_middleware(Guard, key_sha256=None, max_body=1 << 20)

    @app.post("/v1/completions")  # as the gateway's route reads its body: with vLLM's request model
    async def completions(body: CompletionRequest):
        return {}

    r = TestClient(app).post("/v1/completions", json={"model": "m", "prompt": ["2+2="] * 1025, "n": 8})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["message"].startswith("invalid request: prompt list length 1025 exceeds the maximum "
                                                   "allowed count of 1024")


LIMITS = {"max_tokens": 48, "max_n": 8, "max_request_tokens": None, "max_prompt_tokens": 400}


def not_counted(prompt):
    raise AssertionError("a request over its new-token budget is refused before any prompt is tokenized")


@pytest.mark.parametrize("prompt", [["2+2="] * 1000, [[7, 8, 9]] * 1000])
def test_a_list_of_prompts_counts_whole_in_the_new_tokens_of_a_request(prompt):
    """1,000 prompts x n=8 x max_tokens=48 = 384,000 new tokens; the budget, none set, is max_n x max_tokens =
    8 x 48 = 384."""
    from ray.serve.llm.openai_api_models import CompletionRequest

    from selfimprove.gateway import RequestError, check_limits, prompt_list

    body = CompletionRequest(model="m", prompt=prompt, n=8, max_tokens=48)
    with pytest.raises(RequestError) as refused:
        check_limits(body, prompt_list(body.prompt), LIMITS, not_counted)
    assert refused.value.status_code == 400 and refused.value.param == "prompt"
    assert str(refused.value) == ("1000 prompt(s) x n=8 x max_tokens=48 = 384,000 new tokens, over this server's "
                                  "limit of 384 a request")


def test_prompts_within_the_budget_pass():
    """2 prompts x n=4 x 48 = 384: at the budget, not over it; 2 x 3 x 48 = 288 is within a set budget of 300, but
    not 2 x 4 x 48. A chat is one prompt, and gets the server's max_tokens when it gives none: 1 x 8 x 48 = 384."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    from selfimprove.gateway import RequestError, check_limits, prompt_list

    body = CompletionRequest(model="m", prompt=["a b", "c"], n=4, max_tokens=48)
    assert check_limits(body, prompt_list(body.prompt), LIMITS, len) == body
    three = CompletionRequest(model="m", prompt=[[1, 2], [3]], n=3, max_tokens=48)
    assert check_limits(three, prompt_list(three.prompt), {**LIMITS, "max_request_tokens": 300}, len) == three
    with pytest.raises(RequestError, match="= 384 new tokens, over this server's limit of 300 a request"):
        check_limits(body, prompt_list(body.prompt), {**LIMITS, "max_request_tokens": 300}, len)
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=8)
    assert check_limits(chat, [chat.messages], LIMITS, len).max_tokens == 48


def test_a_completions_prompt_is_a_text_tokens_or_a_list_of_either():
    from selfimprove.gateway import prompt_list

    assert prompt_list("hi") == ["hi"] and prompt_list([1, 2]) == [[1, 2]]
    assert prompt_list(["a", "b"]) == ["a", "b"] and prompt_list([[1], [2, 3]]) == [[1], [2, 3]]


def test_a_gateway_without_a_key_refuses_to_start_unless_told(monkeypatch, bundled_model):
    """What a config `--emit-config` wrote without a key does where it is deployed: SELFIMPROVE_API_KEY unset (or
    blank), it does not start; set, or written with --insecure-no-key, it does."""
    from selfimprove.gateway import gateway_app
    from selfimprove.serve import gateway_args

    args = gateway_args(Served("m", {"model": (bundled_model, "m")}), load_config(), key_sha256=None)
    for unset in (None, "  "):
        if unset is None:
            monkeypatch.delenv(KEY_ENV, raising=False)
        else:
            monkeypatch.setenv(KEY_ENV, unset)
        with pytest.raises(UserError, match=f"^no API key: {KEY_ENV} is not set where Serve builds this application"):
            gateway_app(args)
    assert gateway_app({**args, "insecure_no_key": True})
    monkeypatch.setenv(KEY_ENV, "s3cret")
    assert gateway_app(args)


def test_there_is_room_for_replicas_that_fit_in_what_is_free():
    check_room([{"CPU": 2.0, "GPU": 1.0}] * 2, {"CPU": 4.0, "GPU": 2.0, "memory": 1e9})
    with pytest.raises(UserError, match="^its 2 replica\\(s\\) need 4 CPU and 2 GPU, and the cluster has 4 CPU and 1 GPU "
                                        "free$"):
        check_room([{"CPU": 2.0, "GPU": 1.0}] * 2, {"CPU": 4.0, "GPU": 1.0})
    with pytest.raises(UserError, match="need 1 CPU and 0 GPU, and the cluster has 0 CPU and 0 GPU free"):
        check_room([{"CPU": 1.0, "GPU": 0.0}], {})


def test_waiting_for_a_model_ends_when_it_fails_or_its_time_is_up(monkeypatch):
    monkeypatch.setattr("selfimprove.serve.time.sleep", lambda seconds: None)
    states = iter([SimpleNamespace(status="DEPLOYING", message=""),
                   SimpleNamespace(status="DEPLOY_FAILED", message="Traceback ...\nValueError: no config.json\n")])
    with pytest.raises(UserError, match="^did not start: ValueError: no config.json$"):
        wait_running(lambda: next(states), timeout=None)
    with pytest.raises(UserError, match="^did not start within serve.promote_timeout=0.01 s$"):
        wait_running(lambda: SimpleNamespace(status="DEPLOYING", message=""), timeout=0.01)
    wait_running(lambda: SimpleNamespace(status="RUNNING", message=""), timeout=0.01)


OLD = Served("myrun", {"guide": ("/g0", "myrun-guide@iter_0"), "solver": ("/s0", "myrun-solver")}, 0)
NEW = Served("myrun", {"guide": ("/g1", "myrun-guide@iter_1"), "solver": ("/s1", "myrun-solver")}, 1)


def promote(tmp_path, monkeypatch, free: dict, failing: str | None = None):
    """`promote_newer` from OLD to NEW (a guide and a solver, each a 2-CPU replica) on a cluster with `free`
    resources, where application prefix `failing` does not start in time: what it returns, deploys, deletes and
    says, without Ray."""
    import ray
    from ray import serve

    import selfimprove.model_server
    import selfimprove.serve

    done: list[tuple] = []

    def deploy(p, k, args, timeout):
        done.append(("deploy", f"{p}-{k}", timeout))
        if p == failing:
            raise UserError(f"model {args['llm_config']['model_loading_config']['model_source']} did not start "
                            f"within serve.promote_timeout={timeout:g} s")

    monkeypatch.setattr(selfimprove.serve, "from_run", lambda run_dir, name: NEW)
    monkeypatch.setattr(selfimprove.serve, "deploy_model", deploy)
    monkeypatch.setattr(selfimprove.serve.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(selfimprove.model_server, "replica_resources", lambda args: {"CPU": 2.0, "GPU": 0.0})
    monkeypatch.setattr(ray, "available_resources", lambda: free)
    monkeypatch.setattr(serve, "delete", lambda name, _blocking: done.append(("delete", name)))
    cfg, _ = resolve(load_config(None, ["serve.promote_timeout=30"]))
    deployed, said = {"myrun-guide": 0, "myrun-solver": 0}, []
    now = selfimprove.serve.promote_newer(OLD, fake_run(tmp_path, evaluated=2), cfg, True, deployed, said.append)
    return now, deployed, done, said


def test_a_promotion_the_cluster_has_no_room_for_keeps_the_old_model(tmp_path, monkeypatch):
    now, deployed, done, said = promote(tmp_path, monkeypatch, {"CPU": 3.0})
    assert now == dataclasses.replace(OLD, iteration=1) and deployed == {"myrun-guide": 0, "myrun-solver": 0}
    assert done == [] and said == ["not promoted to iteration 1, still serving iteration 0: its 2 replica(s) need "
                                   "4 CPU and 0 GPU, and the cluster has 3 CPU and 0 GPU free"]


def test_a_model_late_to_start_is_deleted_with_the_others_new_and_the_old_ones_serve(tmp_path, monkeypatch):
    now, deployed, done, said = promote(tmp_path, monkeypatch, {"CPU": 4.0}, failing="myrun-solver")
    assert now == dataclasses.replace(OLD, iteration=1) and deployed == {"myrun-guide": 0, "myrun-solver": 0}
    assert done == [("deploy", "myrun-guide-1", 30.0), ("deploy", "myrun-solver-1", 30.0), ("delete", "myrun-guide-1")]
    assert said == ["not promoted to iteration 1, still serving iteration 0: model /s1 did not start within "
                    "serve.promote_timeout=30 s"]


def test_a_promotion_that_fits_and_starts_replaces_the_old_applications(tmp_path, monkeypatch):
    now, deployed, done, said = promote(tmp_path, monkeypatch, {"CPU": 4.0})
    assert now == NEW and deployed == {"myrun-guide": 1, "myrun-solver": 1}
    assert done == [("deploy", "myrun-guide-1", 30.0), ("deploy", "myrun-solver-1", 30.0),
                    ("delete", "myrun-guide-0"), ("delete", "myrun-solver-0")]
    assert said == ["promoted 'myrun' to iteration 1 (guide: /g1, solver: /s1)"]


def test_cli_needs_something_to_serve():
    assert_one_line_error(run("serve"), "give a model or run folder to serve, or --follow RUN_DIR")


def test_cli_refuses_follow_with_an_iteration(tmp_path):
    done = run("serve", "--follow", fake_run(tmp_path, 1), "--iteration", "0")
    assert_one_line_error(done, "--follow promotes each evaluated iteration")


def test_cli_refuses_an_empty_key_and_a_bad_port(tmp_path):
    assert_one_line_error(run("serve", ROOT_MODEL, "--api-key="), "the API key (--api-key) is empty")
    assert_one_line_error(run("serve", ROOT_MODEL, env={"SELFIMPROVE_API_KEY": " "}), "SELFIMPROVE_API_KEY) is empty")
    (tmp_path / "key").write_text("\n")
    assert_one_line_error(run("serve", ROOT_MODEL, f"--api-key-file={tmp_path / 'key'}"),
                          f"the API key (--api-key-file {tmp_path / 'key'}) is empty")
    assert_one_line_error(run("serve", ROOT_MODEL, f"--api-key-file={tmp_path / 'none'}"),
                          f"cannot read --api-key-file {tmp_path / 'none'}: No such file or directory")
    assert_one_line_error(run("serve", ROOT_MODEL, "--api-key=a", f"--api-key-file={tmp_path / 'key'}"),
                          "argument --api-key-file: not allowed with argument --api-key")
    assert_one_line_error(run("serve", ROOT_MODEL, "--port=70000"), "error: --port must be a port number")


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "example.com"])
def test_cli_refuses_a_reachable_host_without_a_key_before_it_binds(host):
    """Refused before Ray starts: nothing binds the address (no server ever runs in these tests)."""
    done = run("serve", ROOT_MODEL, f"--host={host}", env={KEY_ENV: None})
    assert_one_line_error(done, f"serving on {host} without an API key lets anyone who reaches it use it: set "
                                f"{KEY_ENV} or --api-key-file, or pass --insecure-no-key")


def test_loopback_hosts_are_this_machine_only():
    from selfimprove.serve import loopback

    assert all(map(loopback, ["127.0.0.1", "127.8.9.1", "::1", "localhost"]))
    assert not any(map(loopback, ["0.0.0.0", "::", "192.0.2.1", "example.com", "localhost.example.com"]))


def emitted(tmp_path, *args, env=None):
    """The gateway's arguments in the config `serve --emit-config` writes, and what the command said on stderr."""
    out = tmp_path / "serve.yaml"
    done = run("serve", ROOT_MODEL, f"--emit-config={out}", *args, env={KEY_ENV: None, **(env or {})})
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(out.read_text())["applications"][0]["args"], done.stderr


def test_the_key_comes_from_a_file_or_the_environment_and_on_the_command_line_warns(tmp_path):
    (tmp_path / "key").write_text("from-a-file\n")
    digest = {key: hashlib.sha256(key.encode()).hexdigest() for key in ("from-a-file", "from-env", "typed")}
    gateway, warned = emitted(tmp_path, f"--api-key-file={tmp_path / 'key'}")
    assert gateway["key_sha256"] == digest["from-a-file"] and warned == ""
    gateway, warned = emitted(tmp_path, env={KEY_ENV: "from-env"})
    assert gateway["key_sha256"] == digest["from-env"] and warned == ""
    gateway, warned = emitted(tmp_path, "--api-key=typed")
    assert gateway["key_sha256"] == digest["typed"]
    assert warned == ("selfimprove: warning: --api-key is visible to other users of this machine (ps): give it in "
                      f"{KEY_ENV} or a file (--api-key-file)\n")


def test_a_config_written_without_a_key_needs_one_where_it_runs_unless_told(tmp_path):
    gateway, _ = emitted(tmp_path, "--host=0.0.0.0")
    assert (gateway["key_sha256"], gateway["insecure_no_key"]) == (None, False)
    gateway, _ = emitted(tmp_path, "--host=0.0.0.0", "--insecure-no-key")
    assert (gateway["key_sha256"], gateway["insecure_no_key"]) == (None, True)


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
