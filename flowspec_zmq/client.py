"""Python client for apps: stream a generation from a running head.

    client = Client("tcp://127.0.0.1:5599")
    async for text in client.stream("Once upon a time", max_new_tokens=64):
        print(text, end="", flush=True)

    completion = generate("Once upon a time", max_new_tokens=64)   # blocking helper
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from .client_protocol import (
    Accepted, Alive, Cancel, ClientRequestError, Done, Failed, FailureReason, Generate, Info, InfoReply, Reply, Tokens,
    pack, unpack_reply,
)
from .security import Keys
from .transport import receive_frames

DEFAULT_ADDRESS = "tcp://127.0.0.1:5599"
CANCEL_LINGER_MS = 1000  # how long a closed socket still tries to deliver a cancel


class GenerationFailed(RuntimeError):
    """The head could not finish the request; `ids` are the tokens it had committed, `reason` says
    whether the request, a full queue or an unavailable cluster was the cause."""

    def __init__(self, message: str, ids: list[int], reason: FailureReason = "failed") -> None:
        super().__init__(message)
        self.ids = ids
        self.reason = reason


@dataclass
class Completion:
    text: str = ""
    ids: list[int] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


class Client:
    def __init__(self, address: str = DEFAULT_ADDRESS, answer_timeout_s: float = 5.0, keys: Keys | None = None) -> None:
        self.address = address
        self.keys = keys  # CurveZMQ key pair to present when the cluster requires one
        # The head says it is alive at least every ALIVE_S while it holds our request, so a few
        # seconds of silence mean it is gone (or never was there).
        self.answer_timeout_s = answer_timeout_s
        self.context = zmq.asyncio.Context.instance()
        self._ids = itertools.count(1)

    def _socket(self) -> zmq.asyncio.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        if self.keys:
            self.keys.connect_to(socket, "head")
        socket.connect(self.address)
        return socket

    def _silence(self, heard: bool, ids: list[int]) -> GenerationFailed:
        if heard:
            return GenerationFailed(
                f"the head at {self.address} stopped answering for {self.answer_timeout_s:g} s (it died or "
                f"restarted); {len(ids)} tokens were committed before", ids, "unavailable")
        hint = "" if self.keys else "; if the cluster uses CurveZMQ keys ([security] keys), the client needs its key too"
        return GenerationFailed(
            f"nothing answers at {self.address} (waited {self.answer_timeout_s:g} s): start the cluster with "
            f"`flowspec launch`, or check the address{hint}", ids, "unavailable")

    async def _receive(self, socket: zmq.asyncio.Socket, heard: bool, ids: list[int]) -> Reply:
        try:
            frames = await asyncio.wait_for(receive_frames(socket), self.answer_timeout_s)
        except asyncio.TimeoutError:
            raise self._silence(heard, ids) from None
        try:
            return unpack_reply(frames[-1])
        except ClientRequestError as exc:
            raise GenerationFailed(f"the head at {self.address} sent a bad reply: {exc}", ids) from None

    async def _send(self, socket: zmq.asyncio.Socket, message: Generate | Info) -> None:
        # A DEALER with no live connection blocks in send: bound it like a reply.
        try:
            await asyncio.wait_for(socket.send(pack(message)), self.answer_timeout_s)
        except asyncio.TimeoutError:
            raise self._silence(False, []) from None

    async def events(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        prompt_ids: list[int] | None = None,
        stop: list[str] | None = None,
        **options: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Raw events: {"event": "tokens", "id", "ids", "text"} ... then {"event": "done", "id", "stats"}.
        `stop` strings end the output before the first of them (stop_reason "stop"); without a `seed`
        option a sampled request gets a random one, reported in the statistics."""
        request_id = next(self._ids)
        socket = self._socket()
        finished, heard, ids = False, False, []
        try:
            await self._send(socket, Generate(request_id, prompt, messages, prompt_ids, options, stop))
            while True:
                reply = await self._receive(socket, heard, ids)
                if reply.id not in (request_id, -1):
                    continue
                heard = True
                match reply:
                    case Failed():
                        finished = True
                        raise GenerationFailed(reply.message, reply.ids or ids, reply.reason)
                    case Tokens():
                        ids.extend(reply.ids)
                    case Accepted() | Alive():
                        continue
                yield {"event": reply.kind, **asdict(reply)}
                if isinstance(reply, Done):
                    finished = True
                    return
        finally:
            linger = 0
            if not finished:  # the caller stopped early: free the head for others (best effort)
                try:
                    await socket.send(pack(Cancel(request_id)), zmq.NOBLOCK)
                    linger = CANCEL_LINGER_MS  # closing without linger would drop the queued cancel
                except zmq.Again:  # no connection to the head: nothing to cancel there
                    pass
            socket.close(linger=linger)

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
        """The head's model, stages, context and default decoding options."""
        socket = self._socket()
        try:
            await self._send(socket, Info(0))
            while not isinstance(reply := await self._receive(socket, False, []), InfoReply):
                pass
            return reply.info
        finally:
            socket.close()


def generate(prompt: str | None = None, *, address: str = DEFAULT_ADDRESS, **kwargs: Any) -> Completion:
    """Blocking helper for scripts: the whole completion at once."""
    return asyncio.run(Client(address).complete(prompt, **kwargs))
