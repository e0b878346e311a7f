"""The run folder keeps what was run, journals every step durably, and never overwrites a run."""

from __future__ import annotations

import json

import pytest

from clemflow.io.journal import Journal
from clemflow.io.run_folder import RunFolder, RunFolderError
from clemflow.protocol import load_protocol
from clemflow.schedule.clock import VirtualClock

from conftest import PROTOCOLS

CLEM = PROTOCOLS / "clem_2h_6h_24h.yaml"
SLICE = PROTOCOLS / "fibsem_slice_and_view.yaml"


def _open(path, protocol_file=CLEM, clock=None):
    return RunFolder.open(path, load_protocol(protocol_file), protocol_file.read_text(), clock=clock)


def test_new_folder_layout(tmp_path):
    run = _open(tmp_path / "run", clock=VirtualClock(1000.0))
    assert {p.name for p in run.path.iterdir()} == {"run.json", "protocol.yaml", "protocol.resolved.json", "journal.jsonl"}
    assert (run.path / "protocol.yaml").read_text() == CLEM.read_text()
    resolved = json.loads((run.path / "protocol.resolved.json").read_text())
    assert resolved["fibsem"]["sem"]["dwell"] == "2 µs"  # defaults filled in, units kept readable
    assert resolved["confocal"]["late_tolerance"] == "15 min"
    record = json.loads((run.path / "run.json").read_text())
    assert record["run_id"] == run.run_id and record["experiment"] == "clem-uptake-2h-6h-24h"
    (event,) = list(run.journal.events())
    assert (event.step, event.outcome, event.time) == ("run", "created", 1000.0)


def test_reopen_same_protocol_resumes(tmp_path):
    first = _open(tmp_path / "run")
    first.journal.append("acquire", "done", sample="D1")
    second = _open(tmp_path / "run")
    assert second.resumed and second.run_id == first.run_id
    steps = [(e.step, e.outcome) for e in second.journal.events()]
    assert steps == [("run", "created"), ("acquire", "done"), ("run", "resumed")]
    assert [e.seq for e in second.journal.events()] == [0, 1, 2]


def test_other_protocol_is_refused_and_nothing_touched(tmp_path):
    _open(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(RunFolderError, match="different protocol"):
        _open(tmp_path / "run", SLICE)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.tif").write_bytes(b"data")
    with pytest.raises(RunFolderError, match="not empty"):
        _open(tmp_path / "run")
    assert (tmp_path / "run" / "precious.tif").read_bytes() == b"data"


def test_journal_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path, VirtualClock())
    journal.append("slice", "done", index=0)
    journal.append("slice", "done", index=1)
    with path.open("ab") as handle:  # a crash in the middle of a write
        handle.write(b'{"seq":2,"time":"x","t":1,"step":"sli')
    reopened = Journal(path, VirtualClock())
    assert reopened.torn_lines == 1
    event = reopened.append("slice", "done", index=2)
    assert event.seq == 2
    assert [e.data["index"] for e in reopened.events()] == [0, 1, 2]


def test_run_command_hands_a_fibsem_protocol_to_the_engine(cli, tmp_path):
    # The engine needs the relocated target: without targets.json it says how to get one, before any connection.
    code, output = cli("run", SLICE, "--out", tmp_path / "r")
    assert code == 2, output
    assert "no targets file" in " ".join(output.split()) and "relocate the cell first" in " ".join(output.split())
    events = [json.loads(line) for line in (tmp_path / "r" / "journal.jsonl").read_text().splitlines()]
    assert [e["outcome"] for e in events] == ["created"]


def test_run_command_refuses_invalid_protocol_before_creating_anything(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CLEM.read_text().replace("slice_thickness: 15 nm", "slice_thickness: 0 nm"))
    code, output = cli("run", bad, "--out", tmp_path / "r")
    assert code == 2 and "fibsem.slice_thickness" in output
    assert not (tmp_path / "r").exists()


def test_creation_cut_off_before_run_json_is_completed(tmp_path):
    """A crash after the protocol copies but before run.json leaves a folder that the next start completes."""
    protocol = load_protocol(CLEM)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "protocol.yaml").write_text(CLEM.read_text()[:100])  # torn while being written
    run = RunFolder.open(folder, protocol, CLEM.read_text())
    assert not run.resumed and (folder / "run.json").exists()
    assert (folder / "protocol.yaml").read_text() == CLEM.read_text()
