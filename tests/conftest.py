"""Shared fixtures: paths to the example protocols and the real data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = REPO / "protocols"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def protocols_dir() -> Path:
    return PROTOCOLS


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real microscope data not found at {SHARED_DATA}; place shared/data beside the repository")
    return SHARED_DATA


@pytest.fixture
def cli():
    """Invoke the clemflow CLI in-process; returns (exit code, output)."""
    from typer.testing import CliRunner

    from clemflow.cli.app import _register, app

    _register()
    runner = CliRunner()

    def invoke(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
        return result.exit_code, result.output

    return invoke


def pytest_collection_modifyitems(config, items):
    """The longest file (the whole demo) first: on two workers a long file collected last is the suite's tail."""
    items.sort(key=lambda item: 0 if item.fspath.basename == "test_fibsem_estimate.py" else 1)
