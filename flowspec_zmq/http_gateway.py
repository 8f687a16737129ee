"""The OpenAI-compatible HTTP API: a Starlette app that is one more client of the head.

POST /v1/chat/completions and /v1/completions (whole, or streamed as server-sent events), GET
/v1/models, GET /health, GET /metrics (Prometheus text) and the browser chat page at / (files in
flowspec_zmq/web). `serve` runs it with uvicorn for a topology (`flowspec serve`, or `flowspec
launch` with an [http] table).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import socket
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from .client import Client, GenerationFailed
from .client_protocol import FailureReason
from .security import Keys, client_keys
from .topology import HttpConfig, Topology, TopologyError, exposure_problem

log = logging.getLogger(__name__)

WEB = Path(__file__).resolve().parent / "web"

# OpenAI's parameters that are decoding options of the head, under the head's names.
OPTIONS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
           "top_p": "top_p", "seed": "seed"}
# This project's options, accepted as extra body fields under their own names.
PROJECT_OPTIONS = ("mode", "draft", "tree_depth", "tree_top_k", "tree_width", "tree_total_tokens", "segment_size",
                   "draft_vocab", "top_k")
ACCEPTED = {"model", "stream", "stream_options", "stop", "user"}  # read below, or harmless to ignore
# Parameters this server cannot honour: accepted only with the values that ask for nothing.
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((None, 1), "one choice per request"),
    "best_of": ((None, 1), "one choice per request"),
    "logprobs": ((None, False), "no log probabilities"),
    "top_logprobs": ((None, 0), "no log probabilities"),
    "echo": ((None, False), "the prompt is not echoed"),
    "suffix": ((None, ""), "no insertion"),
    "logit_bias": ((None, {}), "no logit bias"),
    "presence_penalty": ((None, 0), "no penalties"),
    "frequency_penalty": ((None, 0), "no penalties"),
    "tools": ((None, []), "no tool calls"),
    "tool_choice": ((None, "none"), "no tool calls"),
    "functions": ((None, []), "no function calls"),
    "function_call": ((None, "none"), "no function calls"),
    "response_format": ((None, {"type": "text"}), "text output only"),
}
FAILURE_STATUS: dict[FailureReason, int] = {"invalid": 400, "busy": 429, "unavailable": 503, "failed": 500}


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    @classmethod
    def from_failure(cls, failure: GenerationFailed) -> ApiError:
        return cls(FAILURE_STATUS[failure.reason], str(failure), code=failure.reason)

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 429: "rate_limit_error", 503: "service_unavailable"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Job:
    """One completion request as the head's client takes it."""

    prompt: dict[str, Any]  # prompt=, messages= or prompt_ids= for Client.events
    options: dict[str, Any]
    stop: list[str] | None = None
    stream: bool = False
    user: str | None = None


def parse_job(body: Any, chat: bool) -> Job:
    """An OpenAI request body as a Job; anything this server cannot honour is a 400."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    prompt_key = "messages" if chat else "prompt"
    for name, value in body.items():
        if name in UNSUPPORTED:
            neutral, why = UNSUPPORTED[name]
            if value not in neutral:
                raise ApiError(400, f"{name}={value!r} is not supported: {why}", name, "unsupported_parameter")
        elif name not in OPTIONS and name not in PROJECT_OPTIONS and name not in ACCEPTED and name != prompt_key:
            raise ApiError(400, f"unknown parameter {name!r}", name, "unknown_parameter")
    if prompt_key not in body:
        raise ApiError(400, f"{prompt_key!r} is required", prompt_key, "missing_parameter")
    stop, stream, user = body.get("stop"), body.get("stream") or False, body.get("user")
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, "user must be a string", "user")
    options = {OPTIONS.get(name, name): value for name, value in body.items()
               if (name in OPTIONS or name in PROJECT_OPTIONS) and value is not None}
    return Job(_messages(body["messages"]) if chat else _prompt(body["prompt"]), options,
               [stop] if isinstance(stop, str) else stop, stream, user)  # the head checks the stop list


def _prompt(value: Any) -> dict[str, Any]:
    """A completion's one prompt: text or token ids, also as the one element of a list."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return {"prompt": value}
    if isinstance(value, list) and value and all(type(i) is int for i in value):
        return {"prompt_ids": value}
    raise ApiError(400, "prompt must be one string or one list of token ids (no batches)", "prompt")


def _messages(value: Any) -> dict[str, Any]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role", f"messages[{i}]")
        messages.append({"role": message["role"], "content": _text(message.get("content"), f"messages[{i}].content")})
    return {"messages": messages}


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise ApiError(400, f"{where} must be text (a string or text parts)", where)


def usage(stats: dict[str, Any]) -> dict[str, int]:
    prompt, completion = stats["prompt_tokens"], stats["tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(stats: dict[str, Any]) -> str:
    return "length" if stats["stop_reason"] == "length" else "stop"  # an eos token or a stop string


def model_name(info: dict[str, Any]) -> str:
    return Path(info["model"]).name  # the prepared model's folder


def closing_fields(stats: dict[str, Any]) -> dict[str, Any]:
    """What a finished completion adds: OpenAI's usage, the sampling seed used, and the head's
    statistics as `flowspec` (less the time of every token)."""
    return {"usage": usage(stats), "seed": stats["seed"],
            "flowspec": {name: value for name, value in stats.items() if name != "token_times"}}


@dataclass(frozen=True)
class Reply:
    """The OpenAI shapes of one completion: the whole response, or its stream of chunks."""

    chat: bool
    model: str
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, kind: str) -> dict[str, Any]:
        prefix = "chatcmpl" if self.chat else "cmpl"
        return {"id": f"{prefix}-{self.id}", "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, stats: dict[str, Any]) -> dict[str, Any]:
        content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        choice = {"index": 0, **content, "logprobs": None, "finish_reason": finish_reason(stats)}
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._envelope(kind), "choices": [choice], **closing_fields(stats)}

    def chunk(self, delta: dict[str, str], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        """One streamed piece; `delta` is a chat delta ({"content": ...}), completions take its text."""
        content = {"delta": delta} if self.chat else {"text": delta.get("content", "")}
        choice = {"index": 0, **content, "logprobs": None, "finish_reason": finish}
        return {**self._envelope("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice], **extra}

    def last_chunk(self, stats: dict[str, Any]) -> dict[str, Any]:
        return self.chunk({}, finish_reason(stats), **closing_fields(stats))


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends, so a client that
    goes away cancels its request on the head at once, not whenever the generator is collected."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache"})
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()


async def _chain(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    yield first
    async for event in rest:
        yield event


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (its body was read already: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, Response]) -> Response:
    """`work`'s response, unless the client leaves first: then `work` is cancelled, and with it the
    request on the head, which serves one request at a time and must not keep computing for nobody."""
    working, leaving = asyncio.ensure_future(work), asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({working, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (working, leaving):
            task.cancel()
        await asyncio.wait({working, leaving})
    if working.cancelled():
        return Response(status_code=499)  # "client closed request": there is no one to send it to
    return working.result()


class Gateway:
    """What the routes share: the head's client, the accepted API keys, the model's name once known."""

    def __init__(self, client: Client, api_keys: Sequence[str]) -> None:
        self.client = client
        self.api_keys = [key.encode() for key in api_keys]
        self.started = int(time.time())
        self._model: str | None = None

    def authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "an API key is required: send 'Authorization: Bearer KEY'", code="missing_api_key")
        # compare_digest: the time taken must not tell how much of a key was right.
        if not any(hmac.compare_digest(key.strip().encode(), known) for known in self.api_keys):
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    async def info(self) -> dict[str, Any]:
        try:
            return await self.client.info()
        except GenerationFailed as failure:
            raise ApiError.from_failure(failure) from None

    async def model(self) -> str:
        """The served model's name, asked from the head once."""
        if self._model is None:
            self._model = model_name(await self.info())
        return self._model

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        info = await self.info()
        entry = {"id": model_name(info), "object": "model", "created": self.started, "owned_by": "flowspec_zmq",
                 "max_context": info["max_context"]}
        return JSONResponse({"object": "list", "data": [entry]})

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool) -> Response:
        self.authorize(request)
        try:
            body = await request.json()
        except ValueError:  # the body is not JSON (JSONDecodeError and UnicodeDecodeError both are)
            raise ApiError(400, "the request body must be JSON") from None
        job = parse_job(body, chat)
        log.info("%s (%s) for user %s", request.url.path, "stream" if job.stream else "whole", job.user or "-")
        reply = Reply(chat, await self.model())
        # Until the response starts nothing else would notice a client that leaves.
        return await _unless_disconnected(request, self._respond(reply, job))

    async def _respond(self, reply: Reply, job: Job) -> Response:
        events = self.client.events(**job.prompt, stop=job.stop, **job.options)
        try:
            first = await anext(events)  # failures before the first token still get their own status
        except GenerationFailed as failure:
            raise ApiError.from_failure(failure) from None
        if job.stream:
            return EventStream(_stream(reply, first, events))
        return JSONResponse(await _whole(reply, first, events))

    async def health(self, request: Request) -> Response:
        try:
            health = (await self.info())["health"]
        except ApiError as error:
            return JSONResponse({"ok": False, "problem": str(error)}, error.status)
        return JSONResponse(health, 200 if health["ok"] else 503)

    async def metrics(self, request: Request) -> Response:
        try:
            info = await self.info()
        except ApiError:  # scrapers want an answer: a silent head is flowspec_head_up 0
            info = None
        return PlainTextResponse(prometheus_text(info), media_type="text/plain; version=0.0.4")


async def _whole(reply: Reply, first: dict[str, Any], events: AsyncGenerator[dict[str, Any], None]) -> dict[str, Any]:
    text, stats = "", {}
    async with aclosing(events):
        try:
            async for event in _chain(first, events):
                if event["event"] == "tokens":
                    text += event["text"]
                else:
                    stats = event["stats"]
        except GenerationFailed as failure:
            raise ApiError.from_failure(failure) from None
    return reply.whole(text, stats)


async def _stream(reply: Reply, first: dict[str, Any], events: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[str, None]:
    async with aclosing(events):  # closing this generator closes the head's stream: that cancels the request
        if reply.chat:
            yield _sse(reply.chunk({"role": "assistant", "content": ""}))
        try:
            async for event in _chain(first, events):
                if event["event"] == "done":
                    yield _sse(reply.last_chunk(event["stats"]))
                elif event["text"]:
                    yield _sse(reply.chunk({"content": event["text"]}))
        except GenerationFailed as failure:  # too late for a status: OpenAI's clients read an error event
            yield _sse(ApiError.from_failure(failure).body())
            return
        yield _sse("[DONE]")


# Prometheus metrics: name, type, help, value from the head's info.
METRICS: list[tuple[str, str, str, Callable[[dict[str, Any]], float]]] = [
    ("healthy", "gauge", "1 when every stage sends heartbeats", lambda i: int(i["health"]["ok"])),
    ("stages", "gauge", "stages in the ring", lambda i: i["stages"]),
    ("requests_total", "counter", "requests finished, failed or cancelled", lambda i: i["metrics"]["requests"]),
    ("requests_failed_total", "counter", "requests that failed", lambda i: i["metrics"]["requests_failed"]),
    ("requests_cancelled_total", "counter", "requests their client cancelled", lambda i: i["metrics"]["requests_cancelled"]),
    ("tokens_total", "counter", "tokens generated", lambda i: i["metrics"]["tokens"]),
    ("decode_seconds_total", "counter", "seconds spent decoding", lambda i: i["metrics"]["decode_seconds"]),
    ("verifications_total", "counter", "verifications that committed tokens", lambda i: i["metrics"]["verifications"]),
    ("recoveries_total", "counter", "re-prefills after a stage failure", lambda i: i["metrics"]["recoveries"]),
    ("tokens_per_second", "gauge", "tokens per decoding second since the head started",
     lambda i: i["metrics"]["tokens"] / i["metrics"]["decode_seconds"] if i["metrics"]["decode_seconds"] else 0.0),
    ("accepted_tokens_per_verification", "gauge", "tokens committed per verification since the head started",
     lambda i: i["metrics"]["tokens"] / i["metrics"]["verifications"] if i["metrics"]["verifications"] else 0.0),
    ("queued_requests", "gauge", "requests waiting for a decoding slot (max_requests)", lambda i: i["metrics"]["queued"]),
    ("running_requests", "gauge", "requests running now", lambda i: i["metrics"]["running"]),
]


def prometheus_text(info: dict[str, Any] | None) -> str:
    """The head's counters in Prometheus' text format; `info` None: the head does not answer."""
    lines = ["# HELP flowspec_head_up 1 when the head answers", "# TYPE flowspec_head_up gauge",
             f"flowspec_head_up {int(info is not None)}"]
    if info is None:
        return "\n".join(lines) + "\n"
    for name, kind, help_text, value in METRICS:
        lines += [f"# HELP flowspec_{name} {help_text}", f"# TYPE flowspec_{name} {kind}", f"flowspec_{name} {value(info)}"]
    lines += ["# HELP flowspec_stage_heartbeat_age_seconds seconds since the stage's last heartbeat (NaN: none yet)",
              "# TYPE flowspec_stage_heartbeat_age_seconds gauge"]
    for stage, age in info["health"]["last_heartbeat_s"].items():
        lines.append(f'flowspec_stage_heartbeat_age_seconds{{stage="{stage}"}} {"NaN" if age is None else age}')
    return "\n".join(lines) + "\n"


async def _page(request: Request) -> Response:
    index = WEB / "index.html"
    if not index.is_file():
        raise ApiError(404, "this installation has no chat page (flowspec_zmq/web/index.html)")
    return FileResponse(index)


async def _api_error(request: Request, error: ApiError) -> Response:
    return JSONResponse(error.body(), error.status)


async def _http_error(request: Request, error: HTTPException) -> Response:
    """Starlette's own errors (unknown path, wrong method) in OpenAI's shape too."""
    return JSONResponse(ApiError(error.status_code, error.detail).body(), error.status_code, headers=error.headers)


def create_app(head_address: str, *, keys: Keys | None = None, api_keys: Sequence[str] = (),
               answer_timeout_s: float = 5.0) -> Starlette:
    """The gateway for the head at `head_address`; with `api_keys`, /v1 asks for one of them."""
    gateway = Gateway(Client(head_address, answer_timeout_s, keys), api_keys)
    routes = [
        Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
        Route("/v1/completions", gateway.completions, methods=["POST"]),
        Route("/v1/models", gateway.models),
        Route("/health", gateway.health),
        Route("/metrics", gateway.metrics),
        Route("/", _page),
        Mount("/static", StaticFiles(directory=WEB, check_dir=False)),
    ]
    return Starlette(routes=routes, exception_handlers={ApiError: _api_error, HTTPException: _http_error})


async def serve(topology: Topology, host: str | None = None, port: int | None = None,
                on_listening: Callable[[], None] = lambda: None) -> None:
    """Serve the topology's head over HTTP until SIGINT or SIGTERM; `host` and `port` override [http]."""
    config = topology.http or HttpConfig()
    host, port = host or config.host, port or config.port
    if problem := exposure_problem(host, config.api_keys):
        raise TopologyError(f"{topology.path}: http: {problem}")
    app = create_app(topology.client_address, keys=client_keys(topology.keys), api_keys=config.api_keys)
    # Bound before announcing: from now on connections wait in the backlog.
    listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    log.info("OpenAI-compatible API on http://%s:%d/v1 for the head at %s", host, port, topology.client_address)
    on_listening()
    # Open streams get a moment to end on shutdown, then are cancelled (which cancels them on the head).
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=3))
    await server.serve(sockets=[listener])
