"""Python client for apps: stream a generation from a running head.

    client = Client("tcp://127.0.0.1:5599")
    async for text in client.stream("Once upon a time", max_new_tokens=64):
        print(text, end="", flush=True)

    completion = generate("Once upon a time", max_new_tokens=64)   # blocking helper
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from .client_protocol import pack, unpack_reply
from .security import Keys
from .transport import receive_frames

DEFAULT_ADDRESS = "tcp://127.0.0.1:5599"


class GenerationFailed(RuntimeError):
    """The head could not finish the request; `ids` are the tokens it had committed."""

    def __init__(self, message: str, ids: list[int]) -> None:
        super().__init__(message)
        self.ids = ids


@dataclass
class Completion:
    text: str = ""
    ids: list[int] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


class Client:
    def __init__(self, address: str = DEFAULT_ADDRESS, timeout_s: float = 300.0, keys: Keys | None = None) -> None:
        self.address = address
        self.keys = keys  # CurveZMQ key pair to present when the cluster requires one
        self.timeout_s = timeout_s  # longest silence from the head before giving up
        self.context = zmq.asyncio.Context.instance()
        self._ids = itertools.count(1)

    def _socket(self) -> zmq.asyncio.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        if self.keys:
            self.keys.connect_to(socket, "head")
        socket.connect(self.address)
        return socket

    async def _receive(self, socket: zmq.asyncio.Socket) -> dict[str, Any]:
        try:
            frames = await asyncio.wait_for(receive_frames(socket), self.timeout_s)
        except asyncio.TimeoutError:
            raise GenerationFailed(f"no answer from the head at {self.address} for {self.timeout_s:.0f} s", []) from None
        return unpack_reply(frames[-1])

    async def _send(self, socket: zmq.asyncio.Socket, message: dict[str, Any]) -> None:
        # A DEALER with no live connection blocks in send: bound it like a reply.
        try:
            await asyncio.wait_for(socket.send(pack(message)), self.timeout_s)
        except asyncio.TimeoutError:
            raise GenerationFailed(f"cannot reach the head at {self.address} for {self.timeout_s:.0f} s", []) from None

    async def events(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        prompt_ids: list[int] | None = None,
        **options: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Raw events: {"event": "tokens", "ids", "text"} ... then {"event": "done", "stats"}."""
        request_id = next(self._ids)
        request: dict[str, Any] = {"op": "generate", "id": request_id, "options": options}
        for key, value in (("prompt", prompt), ("messages", messages), ("prompt_ids", prompt_ids)):
            if value is not None:
                request[key] = value
        socket = self._socket()
        finished = False
        try:
            await self._send(socket, request)
            while True:
                event = await self._receive(socket)
                if event.get("id") not in (request_id, -1):
                    continue
                if event["event"] == "error":
                    finished = True
                    raise GenerationFailed(event.get("message", "unknown error"), event.get("ids", []))
                yield event
                if event["event"] == "done":
                    finished = True
                    return
        finally:
            if not finished:  # the caller stopped early: free the head for others (best effort)
                try:
                    await socket.send(pack({"op": "cancel", "id": request_id}), zmq.NOBLOCK)
                except zmq.Again:  # no connection to the head: nothing to cancel there
                    pass
            socket.close()

    async def stream(self, prompt: str | None = None, **kwargs: Any) -> AsyncIterator[str]:
        """Text as it is committed."""
        async for event in self.events(prompt, **kwargs):
            if event["event"] == "tokens" and event["text"]:
                yield event["text"]

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        completion = Completion()
        async for event in self.events(prompt, **kwargs):
            if event["event"] == "tokens":
                completion.text += event["text"]
                completion.ids.extend(event["ids"])
            elif event["event"] == "done":
                completion.stats = event["stats"]
        return completion

    async def info(self) -> dict[str, Any]:
        socket = self._socket()
        try:
            await self._send(socket, {"op": "info", "id": 0})
            return await self._receive(socket)
        finally:
            socket.close()


def generate(prompt: str | None = None, *, address: str = DEFAULT_ADDRESS, **kwargs: Any) -> Completion:
    """Blocking helper for scripts: the whole completion at once."""
    return asyncio.run(Client(address).complete(prompt, **kwargs))
