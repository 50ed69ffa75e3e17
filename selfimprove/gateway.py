"""The HTTP front of `selfimprove serve`: Ray Serve LLM's OpenAI ingress, narrowed to what a served run needs.

1. Clients ask for public names (`routes`); each names model applications by role: `model`, or `guide` and
   `solver`. A role's requests go to the newest *running* application of its prefix (`<prefix>-<k>`), looked up in
   Serve's status every `POLL_SECONDS`: promoting a model is deploying `<prefix>-<k+1>`, and the old one is deleted
   (drained) only after every gateway has moved on. So no request is dropped by a promotion.
2. Every request passes the bearer token check (constant time, on the token's SHA-256) and the body size limit
   before it is parsed; then `n`, `max_tokens`, the new tokens of the whole request (prompts x n x max_tokens) and
   the prompts' length are checked against the limits. It has `request_timeout_s` to be answered in, waiting
   included, and waits in a bounded queue (the model deployments' `max_queued_requests`). Whatever fails, here or
   below (a full queue, the deadline, an error of ours), gets an OpenAI-style JSON error with its HTTP status, and
   the gateway goes on serving others.
3. Only routes of chat, completions and models exist: no request can load a model (no LoRA paths) or name a file.
4. A guide + solver route answers a chat with the solver, given the guide's greedy guidance as a hint in the last
   user message, as recipe sgft trains and evaluates it; `"include_guidance": true` returns the guidance too.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import time

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.llm.ingress import make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from vllm.exceptions import VLLMClientError

from selfimprove.api_key import KEY_ENV, key_digest
from selfimprove.errors import UserError
from selfimprove.guidance import guide_prompt, with_hint

POLL_SECONDS = 1.0
logger = logging.getLogger(__name__)
ENDPOINTS = {
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
}


class RequestError(Exception):
    """A request the gateway refuses: OpenAI's error body with this HTTP status."""

    def __init__(self, status_code: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status_code, self.param, self.code = status_code, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 500: "server_error", 503: "service_unavailable",
                504: "timeout_error"}.get(self.status_code, "invalid_request_error")
        return JSONResponse({"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}},
                            status_code=self.status_code)


def refusal(e: Exception, timed_out: bool, timeout_s: float | None) -> RequestError:
    """What a request that raised `e` is answered: its own error, or one for what failed below it."""
    if isinstance(e, RequestError):
        return e
    if timed_out:
        return RequestError(504, f"the request was not answered within this server's limit of {timeout_s:g} s",
                            code="timeout")
    if isinstance(e, VLLMClientError):  # vLLM's request models refuse some bodies so, not as validation errors
        return RequestError(400, f"invalid request: {e.args[0]}", param=getattr(e, "parameter", None))
    if isinstance(e, BackPressureError):  # the model's queue (serve.max_queued_requests) is full
        return RequestError(503, "the server is busy: its queue of requests is full; retry shortly", code="queue_full")
    if isinstance(e, DeploymentUnavailableError):
        return RequestError(503, "the model is not running; retry shortly")
    logger.error("request failed", exc_info=e)
    return RequestError(500, f"the server failed to answer ({type(e).__name__}); its log has the details")


def app_name(prefix: str, k: int) -> str:
    return f"{prefix}-{k}"


def newest_running(prefix: str, apps: dict) -> str | None:
    """The running application `<prefix>-<k>` with the largest k, among Serve's `apps` (name -> status)."""
    pattern = re.compile(re.escape(prefix) + r"-(\d+)")
    running = [(int(m.group(1)), name) for name, state in apps.items()
               if (m := pattern.fullmatch(name)) and state == "RUNNING"]
    return max(running)[1] if running else None


class Guard:
    """ASGI middleware: the bearer token and the body size, checked before anything reads the body; the deadline
    (`timeout_s`, None: none); and every failure below it, answered as OpenAI's JSON error."""

    def __init__(self, app, key_sha256: str | None, max_body: int, timeout_s: float | None = None):
        self.app, self.key_sha256, self.max_body, self.timeout_s = app, key_sha256, max_body, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            self._check_token(headers.get(b"authorization", b""))
            if int(headers.get(b"content-length", b"0") or 0) > self.max_body:
                raise RequestError(413, f"request body is over the limit of {self.max_body} bytes")
        except (RequestError, ValueError) as e:
            error = e if isinstance(e, RequestError) else RequestError(400, "content-length is not a number")
            return await error.response()(scope, receive, send)
        seen, started, events, ended = 0, False, False, False

        async def counted():  # a chunked body carries no content-length: count what arrives
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise RequestError(413, f"request body is over the limit of {self.max_body} bytes")
            return message

        async def sending(message):
            nonlocal started, events, ended
            if message["type"] == "http.response.start":
                started = True
                events = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                             for k, v in message.get("headers", []))
            ended = message["type"] == "http.response.body" and not message.get("more_body", False)
            await send(message)

        deadline = asyncio.timeout(self.timeout_s)
        try:
            async with deadline:
                await self.app(scope, counted, sending)
        except Exception as e:  # noqa: BLE001 - whatever failed, the client gets JSON, never a bare 500
            error = refusal(e, deadline.expired(), self.timeout_s)
            if not started:
                return await error.response()(scope, receive, send)
            if ended:
                return
            # The status is sent: a stream ends with the error as its last event, as OpenAI's does.
            last = b"data: " + error.response().body + b"\n\n" if events else b""
            await send({"type": "http.response.body", "body": last, "more_body": False})

    def _check_token(self, header: bytes) -> None:
        if self.key_sha256 is None:
            return
        scheme, _, token = header.decode("latin-1").partition(" ")
        given = key_digest(token.strip())
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.key_sha256):
            raise RequestError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")


class Gateway:
    """The ingress deployment. `routes`: public name -> {role: application prefix}; `limits`: ServeConfig's request
    limits; `tokenizer`: the folder whose tokenizer counts prompt tokens (against `max_prompt_tokens`);
    `guide_max_tokens`: a guidance's budget."""

    def __init__(self, routes: dict[str, dict[str, str]], limits: dict, tokenizer: str, guide_max_tokens: int):
        from transformers import AutoTokenizer

        self.routes, self.limits, self.guide_max_tokens = routes, limits, guide_max_tokens
        # Only a prompt limit counts tokens: without one, no tokenizer takes the replica's memory and start-up time.
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer) if limits["max_prompt_tokens"] is not None else None
        self._apps: dict[str, str | None] = {}  # application prefix -> newest running application
        self._poller = asyncio.get_event_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            try:
                apps = {name: s.status for name, s in (await asyncio.to_thread(serve.status)).applications.items()}
                self._apps = {prefix: newest_running(prefix, apps) for route in self.routes.values()
                              for prefix in route.values()}
            except Exception:  # the controller restarting: keep the last view
                pass
            await asyncio.sleep(POLL_SECONDS)

    async def _app(self, prefix: str):
        """A streaming handle to the application serving `prefix` now."""
        deadline = time.monotonic() + 3 * POLL_SECONDS
        while (app := self._apps.get(prefix)) is None and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS / 4)  # the gateway has just started: its first look is coming
        if app is None:
            raise RequestError(503, "the model is not running yet; retry shortly")
        return serve.get_app_handle(app).options(stream=True)

    def _route(self, model: str | None) -> dict[str, str]:
        if model is None and len(self.routes) == 1:
            return next(iter(self.routes.values()))
        if model not in self.routes:
            raise RequestError(404, f"model {model!r} is not served here (served: {', '.join(self.routes)})",
                               param="model", code="model_not_found")
        return self.routes[model]

    async def models(self, request: Request):
        return {"object": "list", "data": [self._card(name) for name in self.routes]}

    async def model_data(self, model: str, request: Request):
        self._route(model)
        return self._card(model)

    def _card(self, name: str) -> dict:
        return {"id": name, "object": "model", "owned_by": "selfimprove", "roles": sorted(self.routes[name])}

    async def chat(self, body: ChatCompletionRequest, request: Request):
        if not body.messages:
            raise RequestError(400, "messages is empty: send at least one message", param="messages")
        body = check_limits(body, [body.messages], self.limits, self._prompt_tokens)
        route = self._route(body.model)
        if "guide" in route:
            return await self._guided(route, body)
        return await self._forward(route["model"], body, "chat")

    async def completions(self, body: CompletionRequest, request: Request):
        body = check_limits(body, prompt_list(body.prompt), self.limits, self._prompt_tokens)
        route = self._route(body.model)
        if "guide" in route:
            raise RequestError(400, f"model {body.model!r} (a guide and a solver) answers chat requests only: "
                                    "use /v1/chat/completions", param="model")
        return await self._forward(route["model"], body, "completions")

    def _prompt_tokens(self, prompt) -> int:
        """Tokens of one prompt as the engine will see it: a chat's messages with the chat template applied, a
        text, or tokens."""
        if isinstance(prompt, str):
            return len(self.tokenizer(prompt).input_ids)
        if prompt and isinstance(prompt[0], dict):
            text = [dict(m, content=_text(m.get("content"))) for m in prompt]
            prompt = self.tokenizer.apply_chat_template(text, add_generation_prompt=True, tokenize=False)
            return len(self.tokenizer(prompt, add_special_tokens=False).input_ids)
        return len(prompt)

    async def _forward(self, prefix: str, body, method: str, first_packet: str | None = None):
        """`body` answered by the application serving `prefix`: as JSON, or as server-sent events (`stream`)."""
        handle = await self._app(prefix)
        body = body.model_copy(update={"model": None})  # the engine's own name: the response says which snapshot
        stream = getattr(handle, method).remote(body, None)
        first = await first_of(stream)
        chunk = first[0] if isinstance(first, list) else first
        if (error := getattr(chunk, "error", None)) is not None:  # vLLM's ErrorResponse (Ray's is a subclass)
            return JSONResponse({"error": error.model_dump(include={"message", "type", "param", "code"})},
                                status_code=error.code)
        if not body.stream:
            return JSONResponse(chunk.model_dump())

        async def events():
            done = False
            for item in ([first_packet] if first_packet else []) + [first]:
                yield "".join(item) if isinstance(item, list) else item
            async for item in stream:
                packet = "".join(item) if isinstance(item, list) else item
                done = done or packet.rstrip().endswith("data: [DONE]")
                yield packet
            if not done:
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _guided(self, route: dict[str, str], body: ChatCompletionRequest):
        guide = await self._app(route["guide"])
        question = _text(next((m for m in reversed(body.messages) if m.get("role") == "user"),
                              body.messages[-1]).get("content"))
        ask = ChatCompletionRequest(messages=guide_prompt(question), temperature=0.0, max_tokens=self.guide_max_tokens)
        answer = await first_of(guide.chat.remote(ask, None))  # not streamed: one response
        if not hasattr(answer, "choices"):
            raise RequestError(503, f"the guide could not write guidance: {getattr(answer, 'error', answer)}")
        guidance = answer.choices[0].message.content or ""
        solver_body = body.model_copy(update={"messages": with_hint(body.messages, guidance)})
        include = bool((body.model_extra or {}).get("include_guidance"))
        if not include:
            return await self._forward(route["solver"], solver_body, "chat")
        if body.stream:
            packet = f"data: {json.dumps({'object': 'chat.completion.chunk', 'choices': [], 'guidance': guidance})}\n\n"
            return await self._forward(route["solver"], solver_body, "chat", first_packet=packet)
        response = await self._forward(route["solver"], solver_body, "chat")
        if response.status_code != status.HTTP_200_OK:
            return response
        return JSONResponse({**json.loads(response.body), "guidance": guidance})


async def first_of(stream):
    """The first item of a handle's stream. Serve's refusals (a full queue, no replica) are raised as ours: Serve
    gives an ingress's FastAPI app handlers of its own for them, which would answer in plain text."""
    try:
        return await anext(stream)
    except (BackPressureError, DeploymentUnavailableError) as e:
        raise refusal(e, False, None) from None


def prompt_list(prompt) -> list:
    """A completion request's prompts: OpenAI's `prompt` is a text, tokens, or a list of either."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt or [])


def check_limits(body, prompts: list, limits: dict, prompt_tokens):
    """`body` (asking for `prompts`) if it keeps within `limits`, its new-token budget set to the limit where it
    gives none. The whole request's new tokens are counted before any prompt is tokenized (`prompt_tokens`)."""
    n, most = body.n or 1, limits["max_tokens"]
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens  # chat's newer name first
    if n > limits["max_n"]:
        raise RequestError(400, f"n={n} is over this server's limit of {limits['max_n']}", param="n")
    if max_tokens is not None and max_tokens > most:
        raise RequestError(400, f"max_tokens={max_tokens} is over this server's limit of {most}", param="max_tokens")
    budget = limits["max_request_tokens"] or limits["max_n"] * most
    asked = len(prompts) * n * (max_tokens or most)
    if asked > budget:
        raise RequestError(400, f"{len(prompts)} prompt(s) x n={n} x max_tokens={max_tokens or most} = {asked:,} new "
                                f"tokens, over this server's limit of {budget:,} a request",
                           param="prompt" if len(prompts) > 1 else "n")
    if (limit := limits["max_prompt_tokens"]) is not None:
        longest = max(map(prompt_tokens, prompts), default=0)
        if longest > limit:
            raise RequestError(400, f"the prompt has {longest} tokens, over this server's limit of {limit}",
                               param="messages" if isinstance(body, ChatCompletionRequest) else "prompt")
    return body if max_tokens is not None else body.model_copy(update={"max_tokens": most})


def _text(content) -> str:
    """A message's text: OpenAI allows a list of typed parts in place of a string."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def gateway_app(args: dict):
    """Serve application builder: `routes`, `limits` (ServeConfig's request limits), `tokenizer`, `guide_max_tokens`,
    `drain_seconds`, `key_sha256`: the API key's SHA-256 (none: that of SELFIMPROVE_API_KEY where the application
    is built), and `insecure_no_key`: without either, serve with no key rather than refuse to start."""
    env_key = os.environ.get(KEY_ENV, "").strip()
    key = args["key_sha256"] or (env_key and key_digest(env_key)) or None
    if key is None and not args["insecure_no_key"]:
        raise UserError(f"no API key: {KEY_ENV} is not set where Serve builds this application, and its config holds "
                        "no key's digest; set it, or write the config with --insecure-no-key to serve without a key")
    limits = args["limits"]
    ingress = serve.deployment(gateway_class(key, limits["max_body_kb"] * 1024, limits["request_timeout_s"]),
                               name="Gateway",
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                               graceful_shutdown_timeout_s=args["drain_seconds"])
    return ingress.bind(args["routes"], limits, args["tokenizer"], args["guide_max_tokens"])


def gateway_class(key_sha256: str | None, max_body: int, timeout_s: float | None) -> type:
    """`Gateway` as a Serve ingress: its FastAPI app guarded by the token, body and deadline checks, and a body
    FastAPI cannot read (not JSON, a wrong type) answered as OpenAI does, with a 400 naming the field."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # the routes above and nothing else
    app.add_middleware(Guard, key_sha256=key_sha256, max_body=max_body, timeout_s=timeout_s)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        error = (e.errors() or [{}])[0]
        if error.get("type") == "json_invalid":
            return RequestError(400, f"invalid request: the body is not JSON ({error.get('ctx', {}).get('error', '')} "
                                     f"at character {error['loc'][-1]})").response()
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        return RequestError(400, f"invalid request: {where}: {error.get('msg', 'cannot be read')}", param=where).response()

    return make_fastapi_ingress(Gateway, endpoint_map=ENDPOINTS, app=app)
