"""The FIB-SEM bridge on loopback vs OpenFIBSEM's own HTTP server, in one run.

(a) Round trip of a small command: ``ping`` through ``BridgeClient`` (the API
    the engine uses: caller thread -> I/O thread -> server -> back) and through
    a bare pyzmq DEALER (the protocol alone); p50 and p99 over 2000 calls.
    Baseline: OpenFIBSEM's ``/health`` through its own ``FibsemClient``.
(b) Transfer of a 4096 x 3072 frame. What is timed is fetching a frame the
    instrument has already taken, so the backend's imaging time is excluded on
    both sides: the bridge's ``result`` of a finished ``grab_frame`` (the server
    keeps the pixels of the last frames; JSON header + raw buffer, decoded into
    a numpy array) vs OpenFIBSEM's ``last_image`` through ``FibsemClient``
    (TIFF over HTTP, decoded into a ``FibsemImage``). OpenFIBSEM's Demo
    microscope makes uint8 frames, so the bridge is timed with uint16 (the
    issue's frame) and uint8 (the same bytes as the baseline); MB/s = bytes
    of pixels / median seconds (MB = 1e6 bytes). The full ``grab_frame`` time
    (simulator rendering included, time scale 0) is printed for context only,
    and so is a bare pyzmq ROUTER/DEALER transfer of the same bytes (the
    transport's ceiling on this machine).

Both servers are separate processes on this machine. Goal (issue 6): bridge
frame transfer at least 10x OpenFIBSEM's MB/s.

Run: python benchmarks/bench_bridge.py [--fibsem-python PATH]
(OpenFIBSEM needs ``fibsem[server]``; PATH defaults to $CLEMFLOW_FIBSEM_PYTHON,
or this Python if it has fibsem; without it the comparison is skipped.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from clemflow.bridge.backend import FrameRequest
from clemflow.bridge.client import BridgeClient
from clemflow.bridge.local import free_port_pair, serve_bridge

GOAL_RATIO = 10.0
ROUND_TRIPS = 2000
FETCHES = 10
WIDTH, HEIGHT = 4096, 3072

BASELINE_SCRIPT = r"""
import io, json, statistics, sys, time
import requests
from fibsem.server.client import FibsemClient
from fibsem.structures import BeamType, ImageSettings
port, trips, fetches, width, height = (int(a) for a in sys.argv[1:6])
client = FibsemClient(host="127.0.0.1", port=port)
for _ in range(100):
    client.health()
rt = []
for _ in range(trips):
    t = time.perf_counter(); client.health(); rt.append(time.perf_counter() - t)
settings = ImageSettings(resolution=(width, height), dwell_time=2e-6, hfw=20e-6, beam_type=BeamType.ELECTRON)
t = time.perf_counter(); image = client.acquire_image(BeamType.ELECTRON, settings); acquire = time.perf_counter() - t
fetch = []
for _ in range(fetches):
    t = time.perf_counter(); image = client.last_image(BeamType.ELECTRON); fetch.append(time.perf_counter() - t)
raw, nbytes = [], 0
session = requests.Session()
for _ in range(fetches):
    t = time.perf_counter()
    content = session.post(f"http://127.0.0.1:{port}/last_image", json={"beam_type": "ELECTRON"}).content
    raw.append(time.perf_counter() - t); nbytes = len(content)
rt.sort()
print(json.dumps({"p50": rt[len(rt) // 2], "p99": rt[int(len(rt) * 0.99)], "acquire_s": acquire,
                  "fetch_s": statistics.median(fetch), "pixels_bytes": int(image.data.nbytes), "shape": list(image.data.shape),
                  "dtype": str(image.data.dtype), "raw_s": statistics.median(raw), "tiff_bytes": nbytes}))
"""


def start_bridge(tmp: Path) -> tuple[subprocess.Popen, dict]:
    return serve_bridge(["--backend", "sim-smartsem", "--bind", f"tcp://127.0.0.1:{free_port_pair()}", "--sim-time-scale",
                         "0", "--sim-world", "small", "--record", str(tmp / "record"), "--sim-state", str(tmp / "instrument")],
                        tmp / "bridge.log", timeout_s=120)


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.99)]


def bare_dealer_round_trips(address: str, n: int) -> list[float]:
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(address)
    times = []
    try:
        for i in range(n + 100):
            body = json.dumps({"v": 1, "id": f"b{i}", "command": "ping", "args": {}}).encode()
            t = time.perf_counter()
            dealer.send(body)
            if not dealer.poll(5000):
                raise TimeoutError("no reply to ping")
            dealer.recv_multipart()
            if i >= 100:
                times.append(time.perf_counter() - t)
    finally:
        dealer.close(0)
    return times


def raw_zeromq_fetch_s(nbytes: int) -> float:
    """The transport's own ceiling: a bare ROUTER thread answering a DEALER with ``nbytes`` on loopback TCP."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    payload = np.zeros(nbytes, dtype=np.uint8)
    payload[::4096] = 1

    def serve() -> None:
        while True:
            peer, body = router.recv_multipart()
            if body == b"stop":
                return
            router.send_multipart([peer, b"{}", memoryview(payload)], copy=False)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    times = []
    for i in range(FETCHES + 2):
        t = time.perf_counter()
        dealer.send(b"x")
        dealer.recv_multipart(copy=False)
        if i >= 2:
            times.append(time.perf_counter() - t)
    dealer.send(b"stop")
    thread.join(5)
    dealer.close(0)
    router.close(0)
    ctx.term()
    return statistics.median(times)


def measure_bridge(tmp: Path) -> dict:
    proc, listening = start_bridge(tmp)
    try:
        with BridgeClient(listening["commands"], name="bench") as client:
            client.hello()
            for _ in range(200):
                client.ping()
            trips = []
            for _ in range(ROUND_TRIPS):
                t = time.perf_counter()
                client.ping()
                trips.append(time.perf_counter() - t)
            bare = bare_dealer_round_trips(listening["commands"], ROUND_TRIPS)
            out: dict = {"client": percentiles(trips), "bare": percentiles(bare)}
            for bits in (16, 8):
                request = FrameRequest("electron", WIDTH, HEIGHT, 2e-6, bit_depth=bits)
                t = time.perf_counter()
                frame = client.grab_frame(request, key=f"bench/frame-{bits}")
                grab_s = time.perf_counter() - t
                handle = frame.metadata["operation"]
                assert frame.image.shape == (HEIGHT, WIDTH) and frame.image.dtype == np.dtype(f"uint{bits}")
                fetch = []
                for _ in range(FETCHES):
                    t = time.perf_counter()
                    frame = client.result(handle)
                    fetch.append(time.perf_counter() - t)
                out[bits] = {"grab_s": grab_s, "fetch_s": statistics.median(fetch), "bytes": frame.image.nbytes}
            out["raw_s"] = raw_zeromq_fetch_s(out[16]["bytes"])
            return out
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def fibsem_python(flag: str | None) -> str | None:
    if flag:
        return flag
    if os.environ.get("CLEMFLOW_FIBSEM_PYTHON"):
        return os.environ["CLEMFLOW_FIBSEM_PYTHON"]
    if importlib.util.find_spec("fibsem") is not None:
        return sys.executable
    return None


def measure_openfibsem(python: str, tmp: Path) -> dict:
    port = free_port_pair()
    env = dict(os.environ, FIBSEM_SIM_NO_DELAY="1")
    server = subprocess.Popen(
        [python, "-m", "fibsem.server.server", "--manufacturer", "Demo", "--ip-address", "localhost", "--host", "127.0.0.1",
         "--port", str(port)], stdout=open(tmp / "fibsem.log", "w"), stderr=subprocess.STDOUT, env=env, cwd=tmp)
    try:
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"OpenFIBSEM server did not start:\n{(tmp / 'fibsem.log').read_text()[-2000:]}")
            time.sleep(0.2)
        out = subprocess.run([python, "-c", BASELINE_SCRIPT, str(port), str(ROUND_TRIPS), str(FETCHES), str(WIDTH), str(HEIGHT)],
                             capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"OpenFIBSEM client failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fibsem-python", help="a Python with fibsem[server] installed (OpenFIBSEM baseline)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ours = measure_bridge(tmp)
        python = fibsem_python(args.fibsem_python)
        base = None
        if python is None:
            print("OpenFIBSEM comparison skipped: no Python with fibsem[server] (set $CLEMFLOW_FIBSEM_PYTHON or --fibsem-python)")
        else:
            try:
                base = measure_openfibsem(python, tmp)
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as error:
                print(f"OpenFIBSEM comparison skipped: {error}")

    us = 1e6
    p50, p99 = ours["client"]
    print(f"round trip `ping`, BridgeClient:   p50 {p50 * us:.0f} us, p99 {p99 * us:.0f} us ({ROUND_TRIPS} calls, loopback)")
    b50, b99 = ours["bare"]
    print(f"round trip `ping`, bare DEALER:    p50 {b50 * us:.0f} us, p99 {b99 * us:.0f} us")
    if base:
        print(f"round trip OpenFIBSEM `/health`:   p50 {base['p50'] * us:.0f} us, p99 {base['p99'] * us:.0f} us")
        print(f"  ratio OpenFIBSEM / BridgeClient: p50 {base['p50'] / p50:.1f}x, p99 {base['p99'] / p99:.1f}x")
    for bits in (16, 8):
        r = ours[bits]
        mbs = r["bytes"] / r["fetch_s"] / 1e6
        r["mbs"] = mbs
        print(f"frame {WIDTH}x{HEIGHT} uint{bits} through the bridge: {r['fetch_s'] * 1e3:.1f} ms per fetch, {mbs:.0f} MB/s "
              f"(median of {FETCHES}; whole grab_frame incl. rendering {r['grab_s']:.2f} s)")
    raw = ours[16]["bytes"] / ours["raw_s"] / 1e6
    print(f"  (bare pyzmq ROUTER -> DEALER, same bytes, one process: {raw:.0f} MB/s: the loopback transport's own ceiling here)")
    if base:
        h, w = base["shape"]
        base_mbs = base["pixels_bytes"] / base["fetch_s"] / 1e6
        raw_mbs = base["pixels_bytes"] / base["raw_s"] / 1e6
        print(f"frame {w}x{h} {base['dtype']} through OpenFIBSEM: {base['fetch_s'] * 1e3:.1f} ms per last_image, {base_mbs:.0f} MB/s "
              f"(TIFF {base['tiff_bytes'] / 1e6:.1f} MB; HTTP bytes alone without decoding: {raw_mbs:.0f} MB/s; "
              f"acquire_image {base['acquire_s']:.2f} s)")
        for bits in (16, 8):
            print(f"  ratio bridge uint{bits} / OpenFIBSEM: {ours[bits]['mbs'] / base_mbs:.1f}x MB/s (goal >= {GOAL_RATIO:g}x); "
                  f"{ours[bits]['mbs'] / raw_mbs:.1f}x its undecoded HTTP bytes; "
                  f"frames/s {base['fetch_s'] / ours[bits]['fetch_s']:.1f}x")


if __name__ == "__main__":
    main()
