"""Serving what a run makes while it makes it (`--follow`), and a guide + solver pair behind one name: real servers,
two engines each, so `make test-slow`."""

import shutil
import threading
import time

import openai
import pytest
from processes import named
from serving import SMALL, Server, fake_run

from selfimprove.io import SUCCESS

pytestmark = [pytest.mark.engine, pytest.mark.slow]
CHAT = [{"role": "user", "content": "What is 7 plus 5?"}]


def test_follow_promotes_a_new_model_without_failing_a_request(tmp_path, bundled_model):
    run_dir = fake_run(tmp_path, evaluated=1)
    server = Server(tmp_path / "serve.log", "--follow", run_dir, *SMALL)
    server.wait_serving()
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    answered: dict[int, list[str]] = {0: [], 1: []}  # per client: the model id of each answer, in order
    failed: list[str] = []
    stop = threading.Event()

    def ask(who: int):
        while not stop.is_set():
            try:
                answered[who].append(client.chat.completions.create(model="myrun", messages=CHAT, max_tokens=16).model)
            except Exception as e:  # noqa: BLE001 - any failure at all is what this test counts
                failed.append(repr(e))

    clients = [threading.Thread(target=ask, args=(who,)) for who in answered]
    for c in clients:
        c.start()
    try:
        time.sleep(5)
        # The run finishes iteration 1: its model (a copy of the bundled one), then its eval stage's marker.
        shutil.copytree(bundled_model, run_dir / "iter_1" / "train" / "model", dirs_exist_ok=True)
        (run_dir / "iter_1" / "eval").mkdir(parents=True)
        (run_dir / "iter_1" / "eval" / SUCCESS).write_text("{}")
        deadline = time.monotonic() + 900
        while not all("myrun@iter_1" in a[-3:] for a in answered.values()):
            assert time.monotonic() < deadline and not failed, (failed, server.log.read_text()[-3000:])
            time.sleep(1)
        stop.set()
        for c in clients:
            c.join()
        assert failed == []
        for answers in answered.values():  # each client: the old model's answers, then only the new one's
            switch = answers.index("myrun@iter_1")
            assert switch > 0 and set(answers[:switch]) == {"myrun@iter_0"} and set(answers[switch:]) == {"myrun@iter_1"}
        deadline = time.monotonic() + 120  # the old application deleted: its engine drained and stopped
        while "promoted 'myrun' to iteration 1" not in server.log.read_text() or \
                len(named("VLLM::EngineCore", server.proc.pid)) != 1:
            assert time.monotonic() < deadline, server.log.read_text()[-3000:]
            time.sleep(1)
    finally:
        stop.set()
        assert server.stop() == 0


def test_guide_and_solver_answer_behind_one_name(tmp_path):
    server = Server(tmp_path / "serve.log", "smollm2-135m-instruct", "--guide", "smollm2-135m-instruct",
                    "--name=pair", *SMALL, "rollout.max_model_len=1024")
    server.wait_serving()
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    question = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"}]
    try:
        r = client.chat.completions.create(model="pair", messages=question, max_tokens=32, temperature=0,
                                           extra_body={"include_guidance": True})
        assert r.model == "pair-solver" and r.choices[0].message.content
        assert isinstance(r.model_extra["guidance"], str) and r.model_extra["guidance"]
        plain = client.chat.completions.create(model="pair", messages=question, max_tokens=32, temperature=0)
        assert "guidance" not in (plain.model_extra or {})
        assert plain.choices[0].message.content == r.choices[0].message.content  # greedy, alone, no prefix cache
        chunks = list(client.chat.completions.create(model="pair", messages=question, max_tokens=32, temperature=0,
                                                     stream=True, extra_body={"include_guidance": True}))
        assert chunks[0].model_extra["guidance"] == r.model_extra["guidance"]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
        code, answer = server.request("POST", "/v1/completions", {"model": "pair", "prompt": "2+2="})
        assert code == 400 and "answers chat requests only" in answer["error"]["message"]
    finally:
        assert server.stop() == 0
