"""10,000 malformed messages: each gets its error reply, none reaches the instrument, the server keeps serving."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zmq

from clemflow.bridge import wire
from clemflow.bridge.server import BridgeServer
from clemflow.cli.bridge_backends import BackendOptions, open_backend

N_MESSAGES = 10_000
BATCH = 500
COMMANDS = ["hello", "ping", "state", "operation", "result", "record", "set_beam", "set_detector", "cancel", "set_fault",
            "grab_frame", "mill", "move_stage", "autofocus", "autostigmation", "auto_contrast"]
KEYED = COMMANDS[6:]
MILL = {"patterns": [{"kind": "rectangle", "center_m": [0, 0], "width_m": 2e-5, "height_m": 1.5e-8, "depth_m": 5e-6}], "current_a": 7e-10}


def _valid(rng: random.Random, n: int) -> dict:
    """A well-formed request, to be spoiled."""
    command = rng.choice(COMMANDS)
    body = {"v": 1, "id": f"fz-{n}", "command": command, "args": MILL if command == "mill" else {}}
    if command in KEYED:
        body["key"] = f"fuzz/{n}"
    return body


def _message(rng: random.Random, n: int) -> tuple[list[bytes], int, str | None]:
    """(frames, expected error code, expected reply id) for message ``n``."""
    rid = f"fz-{n}"
    kind = rng.randrange(16)
    body = _valid(rng, n)
    if kind == 0:  # random bytes
        return [rng.randbytes(rng.randrange(0, 300))], 400, None
    if kind == 1:  # a valid request cut short
        raw = wire.dumps(body)
        return [raw[: rng.randrange(0, len(raw))]], 400, None
    if kind == 2:  # not an object
        return [json.dumps(rng.choice([[1, 2], 3, "hello", None, True, [], 1.5])).encode()], 400, None
    if kind == 3:  # a wrongly typed envelope field (the id is read first when it is valid)
        field, value = rng.choice([("v", "1"), ("v", True), ("v", 1.0), ("command", 7), ("command", None), ("args", [1]),
                                   ("args", "x"), ("key", {"k": 1}), ("key", ""), ("key", "k" * 300)])
        body[field] = value
        return [wire.dumps(body)], 400, rid
    if kind == 4:  # a bad or missing id
        bad = rng.choice([None, 5, "", "x" * 129, ["a"]])
        if bad is None:
            del body["id"]
        else:
            body["id"] = bad
        return [wire.dumps(body)], 400, None
    if kind == 5:  # unknown command
        body["command"] = rng.choice(["", "MILL", "mill ", "shutdown", "exec", "__init__", rng.randbytes(6).hex()])
        return [wire.dumps(body)], 402, rid
    if kind == 6:  # another protocol version
        body["v"] = rng.choice([0, 2, -1, 99, 10**20])
        return [wire.dumps(body)], 401, rid
    if kind == 7:  # an extra top-level field
        body[rng.choice(["pickle", "ID", "meta", "vv"])] = 1
        return [wire.dumps(body)], 400, rid
    if kind == 8:  # unknown or mistyped arguments
        command = body["command"]
        if command in ("operation", "result", "record", "cancel"):
            body["args"] = {rng.choice(["operation", "key"]): rng.choice([1, None, [], ""])}
        else:
            body["args"] = {**body["args"], rng.choice(["depth", "voltage", "shell", "beam_"]): 1}
        return [wire.dumps(body)], 403, rid
    if kind == 9:  # a set or long command without its idempotency key
        body["command"] = rng.choice(KEYED)
        body.pop("key", None)
        return [wire.dumps(body)], 400, rid
    if kind == 10:  # NaN / Infinity are not JSON
        raw = wire.dumps({**body, "args": {"beam": "ion", "current_a": 1.0}}).replace(b"1.0", rng.choice([b"NaN", b"Infinity", b"-Infinity"]))
        return [raw], 400, None
    if kind == 11:  # not UTF-8
        return [b'{"v":1,"id":"\xff\xfe","command":"hello","args":{}}'], 400, None
    if kind == 12:  # nested far too deep
        depth = rng.randrange(2_000, 50_000)
        return [b"[" * depth + b"]" * depth], 400, None
    if kind == 13:  # wrong frame shapes
        raw = wire.dumps(body)
        return rng.choice([[raw, raw], [b"x", raw], [b"", raw, b"extra"], [b"", b"", raw]]), 400, None
    if kind == 14:  # the REQ-style shape, spoiled: the reply must come back in that shape
        body["command"] = "no_such_command"
        return [b"", wire.dumps(body)], 402, rid
    # kind 15: arguments out of the instrument's range (refused before the instrument, never recorded)
    body.update(command="mill", key=f"fuzz/{n}", args={**MILL, "current_a": rng.choice([1.0, 1e-3, -7e-10])})
    return [wire.dumps(body)], 410, rid


def _oversized(n: int) -> tuple[list[bytes], int, str | None]:
    rid = f"big-{n}"
    raw = wire.dumps({"v": 1, "id": rid, "command": "hello", "args": {"pad": "x" * (wire.MAX_REQUEST_BYTES + 10 * n)}})
    return [raw], 404, rid


@pytest.fixture
def served(tmp_path: Path):
    backend = open_backend("sim-smartsem", BackendOptions(sim_state=tmp_path / "instrument", sim_time_scale=0, sim_world="small"))
    server = BridgeServer(backend, bind="tcp://127.0.0.1:0", record_dir=tmp_path / "record", heartbeat_s=0.5).start()
    try:
        yield server, backend
    finally:
        server.close()
        backend.close()


def test_ten_thousand_malformed_messages(served) -> None:
    server, backend = served
    rng = random.Random(20260601)
    messages = [_message(rng, n) for n in range(N_MESSAGES - 5)] + [_oversized(n) for n in range(5)]
    rng.shuffle(messages)
    assert len(messages) == N_MESSAGES
    vendor_calls_before = _vendor_calls(backend)

    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(server.commands_endpoint)
    try:
        answered: Counter = Counter()
        delimited = {rid for frames, _, rid in messages if rid and len(frames) == 2 and frames[0] == b""}
        for start in range(0, N_MESSAGES, BATCH):
            batch = messages[start:start + BATCH]
            for frames, _, _ in batch:
                dealer.send_multipart(frames)
            for _ in batch:
                assert dealer.poll(10_000), f"no reply after {sum(answered.values())} of {N_MESSAGES}"
                frames = dealer.recv_multipart()
                reply, buffers = wire.split_reply(frames)
                assert reply["ok"] is False and reply["v"] == 1 and buffers == []
                assert set(reply["error"]) == {"code", "name", "message", "retry_safe", "details"}
                answered[(reply["error"]["code"], reply["id"])] += 1
                if reply["id"] is not None:  # answered in the shape it was asked
                    assert (frames[0] == b"") == (reply["id"] in delimited), reply
        expected = Counter((code, rid) for _, code, rid in messages)
        assert answered == expected  # every message answered, with the right code and the id when it could be read
        codes = Counter(code for code, _ in answered.elements())
        assert set(codes) == {400, 401, 402, 403, 404, 410}
        assert codes[404] == 5

        assert _vendor_calls(backend) == vendor_calls_before, "a malformed request reached the instrument"
        assert len(server.record) == 0, "a refused request was recorded"
        assert server._loop_thread is not None and server._loop_thread.is_alive()

        # the next valid requests are served as if nothing happened
        state = _call(dealer, "state")
        assert state["ok"] and state["result"]["busy"] is None
        image, metadata = _grab(dealer, 128, 96)
        assert image.shape == (96, 128) and image.dtype == np.uint8 and image.std() > 0
        assert metadata
    finally:
        dealer.close(0)
        ctx.term()


def _vendor_calls(backend) -> int:
    api = getattr(backend, "api", None) or getattr(backend, "_api")
    return len(api.calls)


def _call(dealer: zmq.Socket, command: str, args: dict | None = None, key: str | None = None) -> dict:
    rid = f"v-{time.monotonic_ns()}"
    dealer.send(wire.encode_request(rid, command, args or {}, key))
    while True:
        assert dealer.poll(20_000), f"no reply to {command}"
        reply, buffers = wire.split_reply(dealer.recv_multipart())
        if reply["id"] == rid:
            reply["_buffers"] = buffers
            return reply


def _grab(dealer: zmq.Socket, width: int, height: int) -> tuple[np.ndarray, dict]:
    started = _call(dealer, "grab_frame", {"beam": "electron", "width_px": width, "height_px": height, "dwell_s": 1e-6}, key="after-fuzz/frame")
    assert started["ok"], started
    op = started["result"]["operation"]
    deadline = time.monotonic() + 60
    while (state := _call(dealer, "operation", {"operation": op})["result"]["state"]) == "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert state == "done"
    result = _call(dealer, "result", {"operation": op})
    assert result["ok"], result
    return wire.decode_image(result["result"]["image"], result["_buffers"]), result["result"]["metadata"]
