"""Who may talk to the bridge: the loopback rule and CURVE keys.

Without keys the bridge listens on loopback only, so nobody else on the
network can reach the microscope. With keys both sockets use ZeroMQ CURVE
(authenticated and encrypted), and only clients whose public key is in the
server's ``allowed/`` folder complete the handshake.

Key folder layout (made by ``clemflow bridge keys DIR --name NAME``)::

    DIR/server.key            server public key: give it to every client
    DIR/server.key_secret     server key pair: stays on the bridge PC (mode 600)
    DIR/allowed/NAME.key      public keys of the clients the server accepts
    DIR/clients/NAME.key      a client's public key
    DIR/clients/NAME.key_secret  a client's key pair: copy it to that client only (mode 600)

A client needs ``server.key`` and its own ``clients/NAME.key_secret``. To let a
client in, put its ``.key`` into ``allowed/``; to shut it out, remove it; the
server reads ``allowed/`` when it starts.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

__all__ = [
    "InsecureBind",
    "KeyFiles",
    "ServerAuth",
    "apply_client_curve",
    "apply_server_curve",
    "check_bind",
    "create_keys",
    "is_loopback",
    "load_client_keys",
    "load_public_key",
    "load_server_keys",
]

SERVER_NAME = "server"
ALLOWED = "allowed"
CLIENTS = "clients"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class InsecureBind(ValueError):
    """A non-loopback address without keys: refused before anything is bound."""


def _host(endpoint: str) -> str | None:
    """The host part of a ``tcp://host:port`` endpoint (brackets of IPv6 removed); None for other transports."""
    match = re.fullmatch(r"tcp://(.+):(\d+|\*)", endpoint.strip())
    if not match:
        return None
    host = match.group(1)
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(endpoint: str) -> bool:
    """True for 127.0.0.0/8, ::1, ``localhost`` and ``ipc://``/``inproc://``; everything else reaches the network."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = _host(endpoint)
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface name, a host name: not provably loopback
        return False


def check_bind(endpoint: str, *, have_keys: bool) -> None:
    """Refuse a network-reachable bind without keys, with a message that says what to do."""
    if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        raise InsecureBind(f"{endpoint!r} is not a tcp://HOST:PORT or ipc:// address")
    if endpoint.startswith("tcp://") and _host(endpoint) is None:
        raise InsecureBind(f"{endpoint!r} is not a tcp://HOST:PORT address")
    if not have_keys and not is_loopback(endpoint):
        raise InsecureBind(
            f"refusing to bind {endpoint} without keys: it is reachable from the network. "
            "Bind a loopback address (tcp://127.0.0.1:PORT), or make keys with `clemflow bridge keys DIR` "
            "and start the server with --keys DIR so only allowed clients get in.")


@dataclass(frozen=True)
class KeyFiles:
    server_public: Path
    server_secret: Path
    client_public: Path
    client_secret: Path
    allowed: Path


def create_keys(directory: str | Path, name: str = "client") -> KeyFiles:
    """Make the server pair (kept if it exists) and a new client pair ``name``, allowed at once."""
    if not _NAME.match(name) or name == SERVER_NAME:
        raise ValueError(f"client name {name!r}: use letters, digits, '.', '_' or '-' (not 'server')")
    root = Path(directory)
    for sub in (root, root / ALLOWED, root / CLIENTS):
        sub.mkdir(parents=True, exist_ok=True)
    server_public, server_secret = root / f"{SERVER_NAME}.key", root / f"{SERVER_NAME}.key_secret"
    if not server_secret.exists():
        zmq.auth.create_certificates(root, SERVER_NAME)
        os.chmod(server_secret, 0o600)
    client_public, client_secret = root / CLIENTS / f"{name}.key", root / CLIENTS / f"{name}.key_secret"
    if client_secret.exists():
        raise FileExistsError(f"a client named {name!r} already has keys in {client_secret.parent}")
    zmq.auth.create_certificates(root / CLIENTS, name)
    os.chmod(client_secret, 0o600)
    shutil.copyfile(client_public, root / ALLOWED / f"{name}.key")
    return KeyFiles(server_public, server_secret, client_public, client_secret, root / ALLOWED)


def load_server_keys(directory: str | Path) -> tuple[bytes, bytes, Path]:
    """(public, secret, allowed folder) of a key folder made by ``create_keys``."""
    root = Path(directory)
    secret_file = root / f"{SERVER_NAME}.key_secret"
    if not secret_file.exists():
        raise FileNotFoundError(f"no {secret_file.name} in {root}: make keys with `clemflow bridge keys {root}`")
    public, secret = zmq.auth.load_certificate(secret_file)
    allowed = root / ALLOWED
    if not allowed.is_dir():
        raise FileNotFoundError(f"no {ALLOWED}/ folder in {root}: no client could get in")
    assert secret is not None
    return public, secret, allowed


def load_client_keys(path: str | Path, name: str | None = None) -> tuple[bytes, bytes]:
    """(public, secret) of a client from its ``.key_secret`` file, or a folder holding it (``name`` picks one)."""
    path = Path(path)
    if path.is_dir():
        if (path / CLIENTS).is_dir():
            path = path / CLIENTS
        candidates = [path / f"{name}.key_secret"] if name else sorted(path.glob("*.key_secret"))
        candidates = [c for c in candidates if c.exists() and c.stem != SERVER_NAME]
        if len(candidates) != 1:
            raise FileNotFoundError(f"expected one client .key_secret in {path}, found {len(candidates)}; name one")
        path = candidates[0]
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key")
    return public, secret


def load_public_key(path: str | Path) -> bytes:
    """A public key from a ``.key`` file (e.g. the server's ``server.key``), or a key folder."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{SERVER_NAME}.key"
    public, _ = zmq.auth.load_certificate(path)
    return public


def apply_server_curve(socket: zmq.Socket, public: bytes, secret: bytes) -> None:
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def apply_client_curve(socket: zmq.Socket, server_public: bytes, public: bytes, secret: bytes) -> None:
    """Set a client socket (DEALER or SUB) to talk CURVE to the server; before connect."""
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret


class ServerAuth:
    """ZAP handler for a context: CURVE clients whose public key is in ``allowed`` get in."""

    def __init__(self, context: zmq.Context, allowed: Path) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.allowed = Path(allowed)
        self.count = len(list(self.allowed.glob("*.key")))
        self._auth = ThreadAuthenticator(context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(self.allowed))

    def stop(self) -> None:
        self._auth.stop()
