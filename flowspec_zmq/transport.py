"""ZeroMQ ring links: every node binds a PULL for its input and connects a PUSH to the next hop."""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from .emulation import LinkProfile, ShapedSender
from .security import Keys
from .protocol import MAX_MESSAGE_BYTES, Message, ProtocolError, decode, encode

log = logging.getLogger(__name__)


def tcp(host: str, port: int) -> str:
    return f"tcp://{host}:{port}"


async def receive_frames(socket: zmq.asyncio.Socket, copy: bool = True) -> list:
    """The next multipart message. With CurveZMQ an asyncio socket can wake up for a message that
    is not there (zmq.Again, even repeatedly while a handshake fails); nothing was consumed, so wait
    a moment, letting the event loop run, and try again."""
    while True:
        try:
            return await socket.recv_multipart(copy=copy)
        except zmq.Again:
            await asyncio.sleep(0.001)


class RingLink:
    """One node's place in the ring: receive from the previous hop, send to the next."""

    def __init__(
        self,
        context: zmq.asyncio.Context,
        listen: str,
        next_hop: str,
        name: str,
        shaping: LinkProfile | None = None,
        keys: Keys | None = None,
        next_name: str = "",
    ) -> None:
        self.name = name
        self.inbound = context.socket(zmq.PULL)
        # zmq drops an oversized message before it reaches us, so a bad peer cannot exhaust memory.
        self.inbound.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.inbound.setsockopt(zmq.LINGER, 0)
        if keys:
            keys.serve(self.inbound)
        self.inbound.bind(listen)
        self.outbound = context.socket(zmq.PUSH)
        self.outbound.setsockopt(zmq.LINGER, 0)
        if keys:
            keys.connect_to(self.outbound, next_name)
        self.outbound.connect(next_hop)
        self.rejected = 0
        self.shaper = ShapedSender(shaping, self._send_frames) if shaping else None

    async def receive(self) -> Message:
        """The next valid message; invalid ones are logged, counted and skipped."""
        while True:
            frames = await receive_frames(self.inbound, copy=False)
            try:
                return decode(frames)
            except ProtocolError as exc:
                self.rejected += 1
                log.warning("%s: rejected a message: %s", self.name, exc)

    async def send(self, message: Message) -> None:
        frames = encode(message)
        if self.shaper is None:
            await self._send_frames(frames)
        else:
            self.shaper.submit(frames, sum(memoryview(f).nbytes for f in frames))

    async def _send_frames(self, frames: list) -> None:
        await self.outbound.send_multipart(frames, copy=False)

    def close(self) -> None:
        self.inbound.close()
        self.outbound.close()
