"""`clemflow bridge serve|keys`: run the FIB-SEM bridge server beside the vendor software, make its keys."""

from __future__ import annotations

import contextlib

import json
import logging
import signal
import sys
from pathlib import Path

import typer

from .app import app
from .console import EXIT_INVALID, EXIT_REFUSED, EXIT_UNAVAILABLE

EXIT_FAILED = 1  # the instrument or its software could not be reached or described

bridge_app = typer.Typer(help="The FIB-SEM bridge (docs/bridge-protocol.md): a server beside the vendor software.",
                         no_args_is_help=True)
app.add_typer(bridge_app, name="bridge")

KEYS_HELP = """Make CURVE keys: the server's pair (kept if it exists) and a new client pair NAME, allowed at once.

Layout of DIR:

  server.key             server public key: give it to every client

  server.key_secret      server key pair: stays on the bridge PC

  allowed/NAME.key       public keys of the clients the server accepts

  clients/NAME.key_secret  the client's key pair: copy it to that client only

  clients/NAME.key       the client's public key

Start the server with `clemflow bridge serve --keys DIR`. A client needs
server.key and its clients/NAME.key_secret. To shut a client out, delete its
file from allowed/ and restart the server.
"""


@bridge_app.command("keys", help=KEYS_HELP)
def keys(
    directory: Path = typer.Argument(..., metavar="DIR", help="Key folder (created if missing)."),
    name: str = typer.Option("client", "--name", help="Name of the client key pair to make."),
) -> None:
    from clemflow.bridge.security import create_keys

    try:
        files = create_keys(directory, name)
    except (FileExistsError, ValueError) as exc:
        typer.echo(f"✗ {exc}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    typer.echo(f"server public key   {files.server_public}  (give to clients)")
    typer.echo(f"server key pair     {files.server_secret}  (stays on the bridge PC)")
    typer.echo(f"client key pair     {files.client_secret}  (copy to the client {name!r} only)")
    typer.echo(f"allowed             {files.allowed / files.client_public.name}")


@bridge_app.command("serve")
def serve(
    backend: str = typer.Option(..., "--backend", help="sim-smartsem, sim-autoscript, smartsem, autoscript or openfibsem."),
    bind: str = typer.Option("tcp://127.0.0.1:5555", "--bind", help="Command address (ROUTER). Non-loopback needs --keys."),
    events: str = typer.Option(None, "--events", help="Event address (PUB); default: the command port + 1."),
    keys_dir: Path = typer.Option(None, "--keys", help="Key folder from `clemflow bridge keys`: CURVE on both sockets, allowed clients only."),
    record: Path = typer.Option(Path("bridge-state/record"), "--record", help="Folder of the idempotency record (keep it across restarts)."),
    sim_state: Path = typer.Option(Path("bridge-state/instrument"), "--sim-state", help="Simulated instrument's state and mill log."),
    sim_time_scale: float = typer.Option(1.0, "--sim-time-scale", help="Simulated seconds per real second; 0 = no delays."),
    sim_seed: int = typer.Option(0, "--sim-seed", help="Seed of the simulated specimen."),
    sim_world: str = typer.Option("full", "--sim-world", help="Simulated specimen: full, or small (starts fast)."),
    sim_drift_step_nm: float = typer.Option(None, "--sim-drift-step-nm", help="Simulated image drift: random-walk SD per mill, nm (default 3)."),
    sim_drift_nm_per_slice: str = typer.Option("0,0", "--sim-drift-nm-per-slice", help="Simulated steady image drift per mill, X,Y nm."),
    sim_drift_jump_probability: float = typer.Option(None, "--sim-drift-jump-probability", help="Simulated drift: chance of a jump per mill (default 0.01)."),
    sim_drift_jump_nm: float = typer.Option(None, "--sim-drift-jump-nm", help="Simulated drift: SD of a jump, nm (default 150)."),
    vendor_host: str = typer.Option(None, "--vendor-host", help="Host of the vendor software (autoscript, openfibsem)."),
    heartbeat: float = typer.Option(1.0, "--heartbeat", help="Seconds between heartbeat events."),
) -> None:
    """Serve one instrument: prints one JSON line {"event": "listening", ...} on stdout, then logs on stderr."""
    from clemflow.bridge.security import InsecureBind, check_bind
    from clemflow.bridge.server import BridgeServer, default_events_endpoint

    _log_to_stderr()
    events = events or default_events_endpoint(bind)
    try:
        for endpoint in (bind, events):
            check_bind(endpoint, have_keys=keys_dir is not None)
    except InsecureBind as exc:
        typer.echo(f"✗ {exc}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    if sim_world not in ("full", "small"):
        raise typer.BadParameter("must be full or small", param_hint="--sim-world")
    if heartbeat <= 0:
        raise typer.BadParameter("must be positive", param_hint="--heartbeat")
    drift_per_slice = _xy(sim_drift_nm_per_slice, "--sim-drift-nm-per-slice")
    for value, hint in ((sim_drift_step_nm, "--sim-drift-step-nm"), (sim_drift_jump_nm, "--sim-drift-jump-nm")):
        if value is not None and value < 0:
            raise typer.BadParameter("must not be negative", param_hint=hint)
    if sim_drift_jump_probability is not None and not 0 <= sim_drift_jump_probability <= 1:
        raise typer.BadParameter("must be between 0 and 1", param_hint="--sim-drift-jump-probability")
    from .bridge_backends import BackendOptions, UnknownBackend, open_backend

    options = BackendOptions(sim_state=sim_state, sim_time_scale=sim_time_scale, sim_seed=sim_seed,
                             sim_world=sim_world, vendor_host=vendor_host,  # type: ignore[arg-type]
                             sim_drift_step_nm=sim_drift_step_nm, sim_drift_nm_per_slice=drift_per_slice,
                             sim_drift_jump_probability=sim_drift_jump_probability,
                             sim_drift_jump_nm=sim_drift_jump_nm)
    try:
        # stdout carries exactly one JSON line for whoever started the server; vendor packages
        # that print while connecting (fibsem does) are sent to stderr with the logs.
        with contextlib.redirect_stdout(sys.stderr):
            instrument = open_backend(backend, options)
    except UnknownBackend as exc:
        typer.echo(f"✗ {exc}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    except ImportError as exc:
        typer.echo(f"✗ backend {backend}: {exc}", err=True)
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    except Exception as exc:  # the vendor software is not there, refuses, ...: say so, not a traceback
        logging.getLogger("clemflow.bridge").debug("opening %s failed", backend, exc_info=True)
        typer.echo(f"✗ could not open backend {backend}: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    try:
        try:
            server = BridgeServer(instrument, bind=bind, events=events, record_dir=record, keys=keys_dir,
                                  heartbeat_s=heartbeat, backend_name=backend)
        except Exception as exc:
            logging.getLogger("clemflow.bridge").debug("starting the bridge failed", exc_info=True)
            typer.echo(f"✗ could not start the bridge over {backend}: {type(exc).__name__}: {exc}", err=True)
            raise typer.Exit(EXIT_FAILED) from None
        try:
            server.start()
        except Exception as exc:  # address in use, missing keys: say so before anyone waits for the line
            typer.echo(f"✗ cannot start the bridge on {bind} / {events}: {exc}", err=True)
            server.close()
            raise typer.Exit(EXIT_REFUSED) from None
        _stop_on_signals(server)
        print(json.dumps({"event": "listening", "commands": server.commands_endpoint, "events": server.events_endpoint,
                          "server_id": server.server_id, "backend": backend, "pid": _pid()}), flush=True)
        try:
            server.wait()
        finally:
            server.close()
    finally:
        instrument.close()


def _pid() -> int:
    import os

    return os.getpid()


def _stop_on_signals(server) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C and SIGTERM end the wait; close() then lets a running operation end and be recorded."""

    def handler(signum: int, frame: object) -> None:
        logging.getLogger("clemflow.bridge.server").info("signal %d: stopping", signum)
        server.stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _log_to_stderr() -> None:
    """rich on a terminal; plain one-line records when stderr is a file or a pipe (a service, a test)."""
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("clemflow")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _xy(text: str, hint: str) -> tuple[float, float]:
    """``"X,Y"`` -> (x, y) floats, or a usage error naming the option."""
    try:
        x, y = (float(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected X,Y (two numbers), got {text!r}", param_hint=hint) from None
    return x, y
