"""`selfimprove serve` as a user runs it: a real server (Ray Serve LLM over a vLLM engine) on loopback, its key in a
file, driven with the official `openai` client and with raw HTTP for every bad input and a burst past its queue; it
keeps serving after each."""

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serving import SMALL, Server

KEY = "test-key-0123456789"
QUEUE = 16  # requests that may wait for the engine, beyond its serve.max_ongoing_requests (32)
pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    (folder / "key").write_text(KEY + "\n")
    log = folder / "serve.log"
    s = Server(log, "smollm2-135m-instruct", "--name=smol", f"--api-key-file={folder / 'key'}", *SMALL,
               f"serve.max_queued_requests={QUEUE}")
    s.wait_serving()
    yield s
    assert s.stop() == 0, log.read_text()[-3000:]
    assert "stopped serving" in log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)


CHAT = [{"role": "user", "content": "What is 7 plus 5? Answer with the number."}]


def test_lists_the_one_served_name(client):
    assert [m.id for m in client.models.list().data] == ["smol"]


def test_chat_answers_within_max_tokens(client):
    r = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=24, temperature=0)
    assert r.model == "smol" and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert 1 <= r.usage.completion_tokens <= 24 and r.choices[0].finish_reason in ("stop", "length")


def test_streamed_chat_is_the_same_text_as_one_response(client):
    """Greedy, each request alone in the engine and no prefix cache: the same computation either way."""
    whole = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="smol", messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def test_n_samples_and_a_seed_gives_them_again(client):
    ask = dict(model="smol", messages=CHAT, max_tokens=16, temperature=1.0, n=3, seed=7)
    first, again = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]


def test_a_request_without_max_tokens_gets_the_servers_limit(client):
    story = [{"role": "user", "content": "Write a long story about a dragon who learns to count."}]
    r = client.chat.completions.create(model="smol", messages=story, temperature=0)
    assert r.usage.completion_tokens == 48 and r.choices[0].finish_reason == "length"


def test_completions_with_a_stop_string(client):
    r = client.completions.create(model="smol", prompt="Count: one, two, three,", max_tokens=16, temperature=0,
                                  stop=[","])
    assert r.model == "smol" and "," not in r.choices[0].text and r.usage.completion_tokens <= 16


def test_streamed_completions(client):
    chunks = list(client.completions.create(model="smol", prompt="The capital of France is", max_tokens=8,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices)


BAD = {  # what -> (body or raw bytes, the status, a fragment of the error message, the param named)
    "malformed JSON": (b'{"model": "smol", "messages": [', 400, "invalid request", None),
    "messages not a list": ({"model": "smol", "messages": "hi"}, 400, "messages", "messages"),
    "max_tokens not a number": ({"model": "smol", "messages": CHAT, "max_tokens": "ten"}, 400, "max_tokens", "max_tokens"),
    "unknown model": ({"model": "gpt-4", "messages": CHAT}, 404, "'gpt-4' is not served here", "model"),
    "a path as the model": ({"model": "../../etc/passwd", "messages": CHAT}, 404, "is not served here", "model"),
    "n over the limit": ({"model": "smol", "messages": CHAT, "n": 5}, 400, "n=5 is over this server's limit of 4", "n"),
    "max_tokens over the limit": ({"model": "smol", "messages": CHAT, "max_tokens": 49}, 400,
                                  "max_tokens=49 is over this server's limit of 48", "max_tokens"),
    "max_completion_tokens over the limit": ({"model": "smol", "messages": CHAT, "max_completion_tokens": 100}, 400,
                                             "max_tokens=100 is over this server's limit of 48", "max_tokens"),
    "empty messages": ({"model": "smol", "messages": []}, 400, "messages is empty", "messages"),
    "prompt over the prompt limit": ({"model": "smol", "messages": [{"role": "user", "content": "word " * 450}]},
                                     400, "over this server's limit of 400", "messages"),
}


@pytest.mark.parametrize("what", BAD)
def test_bad_request_gets_its_status_and_an_openai_error(server, what):
    body, status, fragment, param = BAD[what]
    code, answer = server.request("POST", "/v1/chat/completions", body, key=KEY)
    assert code == status, answer
    assert fragment in answer["error"]["message"] and answer["error"]["param"] == param


@pytest.mark.parametrize("prompts, n, max_tokens, fragment", [
    (3000, 8, 8, "prompt list length 3000 exceeds the maximum allowed count of 1024"),  # vLLM's own limit
    (100, 4, 8, "100 prompt(s) x n=4 x max_tokens=8 = 3,200 new tokens, over this server's limit of 192 a request"),
])
def test_a_list_of_prompts_over_the_limit_is_a_400(server, prompts, n, max_tokens, fragment):
    """Token prompts, to keep 3,000 within the 16 KiB body limit; the budget is max_n x max_tokens = 4 x 48."""
    body = {"model": "smol", "prompt": [[7]] * prompts, "n": n, "max_tokens": max_tokens}
    code, answer = server.request("POST", "/v1/completions", body, key=KEY)
    assert code == 400 and fragment in answer["error"]["message"] and answer["error"]["param"] == "prompt", answer


def test_a_burst_past_the_queue_gets_503s_and_leaves_the_server_serving(server, client):
    """200 requests at once, to an engine taking 32 at a time with 16 more waiting: each is answered, or refused
    with OpenAI's error and status 503."""
    start = threading.Barrier(200)
    story = [{"role": "user", "content": "Write a long story about a dragon who learns to count."}]

    def ask(_):
        start.wait()
        return server.request("POST", "/v1/chat/completions", {"model": "smol", "messages": story, "max_tokens": 48},
                              key=KEY)

    with ThreadPoolExecutor(200) as pool:
        answers = list(pool.map(ask, range(200)))
    assert {code for code, _ in answers} <= {200, 503}
    refused = [answer for code, answer in answers if code == 503]
    assert refused and all(a["error"]["code"] == "queue_full" and a["error"]["type"] == "service_unavailable"
                           for a in refused), refused[:1]
    assert all(answer["choices"][0]["message"]["content"] for code, answer in answers if code == 200)
    r = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=8, temperature=0)
    assert r.choices[0].message.content


def test_prompt_longer_than_the_context_is_refused_by_the_engine(server):
    """390 tokens pass the prompt limit (400) but not the 384-token context."""
    code, answer = server.request("POST", "/v1/completions", {"model": "smol", "prompt": [7] * 390, "max_tokens": 8},
                                  key=KEY)
    assert code == 400 and "context" in answer["error"]["message"]


def test_no_request_reads_a_file_or_sets_a_template(server):
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]
    for body in ({"model": "smol", "messages": image, "max_tokens": 4},
                 {"model": "smol", "messages": CHAT, "max_tokens": 4, "chat_template": "{{ 'x' }}"}):
        code, answer = server.request("POST", "/v1/chat/completions", body, key=KEY)
        assert code == 400 and "error" in answer, answer


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {KEY}", "Bearer"])
def test_missing_or_wrong_key_is_401(server, header):
    code, answer = server.request("GET", "/v1/models", headers={"Authorization": header} if header else {})
    assert code == 401 and answer["error"]["code"] == "invalid_api_key"


def test_body_over_the_limit_is_413(server):
    body = {"model": "smol", "messages": [{"role": "user", "content": "x" * 17_000}]}
    code, answer = server.request("POST", "/v1/chat/completions", body, key=KEY)
    assert code == 413 and "16384 bytes" in answer["error"]["message"]


def test_client_leaving_mid_stream_leaves_the_server_serving(server, client):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps({"model": "smol", "messages": CHAT, "max_tokens": 48,
                                                             "stream": True}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.sock.close()  # gone without reading the rest
    conn.close()
    r = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=8, temperature=0)
    assert r.choices[0].message.content


def test_still_serving_after_every_bad_input(client):
    r = client.chat.completions.create(model="smol", messages=CHAT, max_tokens=8)
    assert len(r.choices) == 1
