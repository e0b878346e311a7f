"""Bytes on the wire: JSON envelopes, image frames and events (docs/bridge-protocol.md).

Shared by the server and the client so that both read and write exactly one
format. JSON is strict in both directions: ``NaN`` and ``Infinity`` are not
JSON and are refused, so a value that is not a real number can never reach a
range check that would let it through.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "MAX_REQUEST_BYTES",
    "PROTOCOL_VERSION",
    "SOCKET_MAX_MESSAGE_BYTES",
    "TOPICS",
    "canonical",
    "decode_event",
    "decode_image",
    "dumps",
    "encode_event",
    "encode_request",
    "failure",
    "image_buffer",
    "image_header",
    "jsonable",
    "loads",
    "ok",
    "request",
    "sniff_id",
    "split_reply",
]

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 1 << 20
"""Largest request the server reads (1 MiB); larger ones get ``too_large``."""
SOCKET_MAX_MESSAGE_BYTES = 64 << 20
"""ZeroMQ's own cut-off, far above MAX_REQUEST_BYTES so an oversized request is answered, not dropped."""
TOPICS = ("heartbeat", "operation", "alarm", "log")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def loads(data: bytes | str) -> Any:
    """Parse strict JSON (no NaN/Infinity)."""
    return json.loads(data, parse_constant=_refuse_constant)


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; refuses NaN/Infinity rather than writing invalid JSON."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode("utf-8")


def canonical(obj: Any) -> str:
    """The form in which idempotency compares arguments: sorted keys, no whitespace, ``null`` members dropped
    (an argument given as ``null`` means the same as one left out)."""
    return json.dumps(_without_nulls(obj), sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def _without_nulls(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_without_nulls(v) for v in obj]
    return obj


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays, tuples, paths and non-finite floats made plain JSON (NaN -> null)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def request(id: str, command: str, args: dict[str, Any] | None = None, key: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": id, "command": command, "args": dict(args or {})}
    if key is not None:
        body["key"] = key
    return body


def encode_request(id: str, command: str, args: dict[str, Any] | None = None, key: str | None = None) -> bytes:
    return dumps(request(id, command, args, key))


def ok(id: str | None, result: Any, *, replayed: bool = False) -> dict[str, Any]:
    reply: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": id, "ok": True, "result": result}
    if replayed:
        reply["replayed"] = True
    return reply


def failure(id: str | None, error: dict[str, Any], *, replayed: bool = False) -> dict[str, Any]:
    reply: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": id, "ok": False, "error": error}
    if replayed:
        reply["replayed"] = True
    return reply


def split_reply(frames: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    """``[reply, buffers...]`` or ``["", reply, buffers...]`` -> (reply, buffers)."""
    if frames and len(frames[0]) == 0:
        frames = frames[1:]
    if not frames:
        raise ValueError("empty reply")
    reply = loads(frames[0])
    if not isinstance(reply, dict):
        raise ValueError("reply is not a JSON object")
    return reply, list(frames[1:])


_ID_AT_START = re.compile(rb'^\s*\{\s*(?:"v"\s*:\s*-?\d+\s*,\s*)?"id"\s*:\s*"([^"\\]{1,128})"')


def sniff_id(raw: bytes) -> str | None:
    """The request id of a message too large to parse, when it is the first (or second, after v) field."""
    match = _ID_AT_START.match(raw[:512])
    if not match:
        return None
    try:
        return match.group(1).decode("utf-8")
    except UnicodeDecodeError:
        return None


def image_header(image: NDArray[Any], buffer: int = 1) -> dict[str, Any]:
    """The ``image`` object of a frame reply (section 6) describing ``image`` in buffer ``buffer``."""
    if image.dtype not in (np.uint8, np.uint16) or image.ndim != 2:
        raise ValueError(f"a frame is a 2-D uint8 or uint16 array, not {image.ndim}-D {image.dtype}")
    return {"buffer": buffer, "dtype": str(image.dtype), "byte_order": "little", "shape": [int(n) for n in image.shape], "order": "C"}


def image_buffer(image: NDArray[Any]) -> memoryview:
    """The pixel buffer: C order, little-endian, sent without a copy when it already is."""
    little = image.astype(image.dtype.newbyteorder("<"), copy=False)
    return memoryview(np.ascontiguousarray(little)).cast("B")


def decode_image(header: dict[str, Any], buffers: list[bytes] | list[memoryview]) -> NDArray[Any]:
    """The array an ``image`` header and its reply's buffers describe; checks the size exactly."""
    dtype = np.dtype(str(header["dtype"])).newbyteorder("<" if header.get("byte_order", "little") == "little" else ">")
    if dtype.name not in ("uint8", "uint16"):
        raise ValueError(f"unexpected pixel type {header['dtype']!r}")
    shape = tuple(int(n) for n in header["shape"])
    if len(shape) != 2 or header.get("order", "C") != "C":
        raise ValueError(f"unexpected image layout {shape} order {header.get('order')!r}")
    index = int(header.get("buffer", 1)) - 1
    if not 0 <= index < len(buffers):
        raise ValueError(f"reply has {len(buffers)} buffer(s); the image names buffer {index + 1}")
    data = buffers[index]
    expected = shape[0] * shape[1] * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"image buffer holds {len(data)} bytes, {shape} {dtype.name} needs {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def encode_event(topic: str, body: dict[str, Any]) -> list[bytes]:
    return [topic.encode("ascii"), dumps(body)]


def decode_event(frames: list[bytes]) -> tuple[str, dict[str, Any]]:
    if len(frames) != 2:
        raise ValueError(f"an event has 2 frames, not {len(frames)}")
    body = loads(frames[1])
    if not isinstance(body, dict):
        raise ValueError("event body is not a JSON object")
    return frames[0].decode("ascii"), body
