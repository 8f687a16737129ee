"""Optional CurveZMQ on every link: encryption plus an allow-list of public keys.

`flowspec keys DIR` writes one key pair per node (NAME.key, NAME.key_secret) and one for clients.
With `[security] keys = "DIR"` in topology.toml every listening socket is a CURVE server that only
accepts peers whose public key is in DIR, and every connecting socket proves its own key and checks
the server's, so a peer without an allowed key can neither inject nor read messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

CLIENT = "client"


def create_keys(folder: Path, names: list[str]) -> list[Path]:
    """Key pairs for these nodes plus the client; returns the public key files."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for name in [*names, CLIENT]:
        public, _ = zmq.auth.create_certificates(folder, name)
        made.append(Path(public))
    return made


@dataclass(frozen=True)
class Keys:
    folder: Path
    own: str  # whose key pair this side uses

    def _pair(self, name: str) -> tuple[bytes, bytes]:
        path = self.folder / f"{name}.key_secret"
        if not path.exists():
            raise FileNotFoundError(f"no secret key for {name!r} in {self.folder}; run `flowspec keys {self.folder}`")
        public, secret = zmq.auth.load_certificate(path)
        return public, secret

    def _public(self, name: str) -> bytes:
        path = self.folder / f"{name}.key"
        if not path.exists():
            raise FileNotFoundError(f"no public key for {name!r} in {self.folder}")
        return zmq.auth.load_certificate(path)[0]

    def serve(self, socket: zmq.Socket) -> None:
        """Make a listening socket a CURVE server (call before bind)."""
        socket.curve_publickey, socket.curve_secretkey = self._pair(self.own)
        socket.curve_server = True

    def connect_to(self, socket: zmq.Socket, server: str) -> None:
        """Authenticate a connecting socket to `server`'s key (call before connect)."""
        socket.curve_publickey, socket.curve_secretkey = self._pair(self.own)
        socket.curve_serverkey = self._public(server)


def client_keys(folder: Path | None) -> Keys | None:
    """The client's key pair when the cluster requires keys ([security] keys), else None."""
    return Keys(folder, CLIENT) if folder else None


def start_authenticator(context: zmq.Context, folder: Path) -> ThreadAuthenticator:
    """Accept CURVE clients whose public key is one of the `.key` files in `folder`.

    The checks run on a thread of their own, so a handshake never waits on a node's event loop.
    `context` must be a plain zmq.Context sharing the node's sockets' underlying context."""
    authenticator = ThreadAuthenticator(context)  # a plain (thread-safe to create) context
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(folder))
    return authenticator
