"""Bridge security: CURVE on both sockets, allowed keys only, and no network bind without keys."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from clemflow.bridge import wire
from clemflow.bridge.security import InsecureBind, apply_client_curve, check_bind, is_loopback, load_client_keys, load_public_key
from clemflow.bridge.server import BridgeServer
from clemflow.cli.bridge_backends import BackendOptions, open_backend


@pytest.fixture
def keys(tmp_path: Path, cli) -> Path:
    directory = tmp_path / "keys"
    code, out = cli("bridge", "keys", directory, "--name", "engine")
    assert code == 0, out
    return directory


@pytest.fixture
def secured(tmp_path: Path, keys: Path):
    """sim-smartsem behind CURVE, bound on every interface (allowed because it has keys)."""
    backend = open_backend("sim-smartsem", BackendOptions(sim_state=tmp_path / "instrument", sim_time_scale=0, sim_world="small"))
    server = BridgeServer(backend, bind="tcp://0.0.0.0:0", events="tcp://0.0.0.0:0", record_dir=tmp_path / "record",
                          keys=keys, heartbeat_s=0.1).start()
    try:
        yield server
    finally:
        server.close()
        backend.close()


def _local(endpoint: str) -> str:
    return endpoint.replace("0.0.0.0", "127.0.0.1")


def _socket(ctx: zmq.Context, kind: int, endpoint: str, curve: tuple[bytes, bytes, bytes] | None) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.linger = 0
    if curve is not None:
        apply_client_curve(sock, *curve)
    if kind == zmq.SUB:
        sock.subscribe(b"")
    sock.connect(endpoint)
    return sock


def test_key_folder_layout(keys: Path, cli) -> None:
    assert {p.name for p in keys.iterdir()} == {"server.key", "server.key_secret", "allowed", "clients"}
    assert [p.name for p in (keys / "allowed").iterdir()] == ["engine.key"]
    assert (keys / "clients" / "engine.key_secret").stat().st_mode & 0o077 == 0
    assert (keys / "server.key_secret").stat().st_mode & 0o077 == 0
    server_public = load_public_key(keys / "server.key")
    code, _ = cli("bridge", "keys", keys, "--name", "second")
    assert code == 0
    assert load_public_key(keys) == server_public  # the server pair is kept: existing clients still get in
    assert sorted(p.name for p in (keys / "allowed").iterdir()) == ["engine.key", "second.key"]
    code, out = cli("bridge", "keys", keys, "--name", "engine")
    assert code == 2 and "already has keys" in out


def test_allowed_key_in_unknown_key_and_plain_client_out(secured: BridgeServer, keys: Path, tmp_path: Path) -> None:
    server_public = load_public_key(keys / "server.key")
    allowed = (server_public, *load_client_keys(keys / "clients"))
    zmq.auth.create_certificates(tmp_path, "stranger")
    stranger = (server_public, *load_client_keys(tmp_path / "stranger.key_secret"))
    commands, events = _local(secured.commands_endpoint), _local(secured.events_endpoint)
    ctx = zmq.Context()
    try:
        good = _socket(ctx, zmq.DEALER, commands, allowed)
        good_sub = _socket(ctx, zmq.SUB, events, allowed)
        outsiders = {
            "unknown key": _socket(ctx, zmq.DEALER, commands, stranger),
            "no CURVE": _socket(ctx, zmq.DEALER, commands, None),
        }
        outsider_subs = {"unknown key": _socket(ctx, zmq.SUB, events, stranger), "no CURVE": _socket(ctx, zmq.SUB, events, None)}
        hello = wire.encode_request("1", "hello")
        for sock in (good, *outsiders.values()):
            sock.send(hello)

        assert good.poll(5000), "an allowed client got no reply"
        reply, _ = wire.split_reply(good.recv_multipart())
        assert reply["ok"] and reply["result"]["server_id"] == secured.server_id
        assert good_sub.poll(5000), "an allowed subscriber got no heartbeat"
        topic, body = wire.decode_event(good_sub.recv_multipart())
        assert topic == "heartbeat" and body["server_id"] == secured.server_id

        deadline = time.monotonic() + 2.0  # ~20 heartbeats at 0.1 s: a subscriber that could hear would have
        heard = {}
        while time.monotonic() < deadline:
            for name, sock in [*outsiders.items(), *((f"{n} (events)", s) for n, s in outsider_subs.items())]:
                if sock.poll(0):
                    heard[name] = sock.recv_multipart()
            time.sleep(0.05)
        assert heard == {}
        # the server is unharmed by the refused handshakes
        good.send(wire.encode_request("2", "ping"))
        assert good.poll(5000)
        assert wire.split_reply(good.recv_multipart())[0]["ok"]
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "tcp://localhost:0", "tcp://[::1]:5555", "ipc:///tmp/bridge.sock"])
def test_loopback_addresses_need_no_keys(endpoint: str) -> None:
    assert is_loopback(endpoint)
    check_bind(endpoint, have_keys=False)


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.20:5555", "tcp://microscope-pc:5555",
                                      "tcp://eth0:5555", "tcp://[::]:5555"])
def test_network_bind_without_keys_is_refused_before_binding(endpoint: str, cli, tmp_path: Path) -> None:
    assert not is_loopback(endpoint)
    with pytest.raises(InsecureBind):
        BridgeServer(_NeverCalled(), bind=endpoint, record_dir=tmp_path / "record")
    assert not (tmp_path / "record").exists()  # refused before anything was made
    code, out = cli("bridge", "serve", "--backend", "sim-smartsem", "--bind", endpoint, "--record", tmp_path / "r2",
                    "--sim-state", tmp_path / "s2")
    assert code == 3
    assert endpoint in out and "--keys" in out
    assert not (tmp_path / "s2").exists()  # the instrument was never opened


def test_network_event_address_without_keys_is_refused(cli, tmp_path: Path) -> None:
    code, out = cli("bridge", "serve", "--backend", "sim-smartsem", "--bind", "tcp://127.0.0.1:0", "--events", "tcp://0.0.0.0:0",
                    "--record", tmp_path / "r", "--sim-state", tmp_path / "s")
    assert code == 3 and "tcp://0.0.0.0:0" in out and "--keys" in out


class _NeverCalled:
    """Any attribute access fails: the refusal must come before the backend is touched."""

    def __getattr__(self, name: str):
        raise AssertionError(f"backend.{name} used before the bind was checked")
