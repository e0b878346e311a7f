"""Bad protocol files: each is refused with exit 2 and a message naming its line and field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import PROTOCOLS

BASE = (PROTOCOLS / "clem_2h_6h_24h.yaml").read_text(encoding="utf-8")

# (id, text in the valid CLEM protocol, replacement, expected field path, words expected in the message)
CASES = [
    ("misspelled-field", "    dwell: 2 us", "    dwel: 2 us", "fibsem.sem.dwel", "did you mean 'dwell'"),
    ("unitless", "    dwell: 2 us", "    dwell: 2", "fibsem.sem.dwell", "has no unit"),
    ("wrong-unit", "slice_thickness: 15 nm", "slice_thickness: 15 kV", "fibsem.slice_thickness", "is a voltage"),
    ("dwell-out-of-range", "    dwell: 2 us", "    dwell: 5 ms", "fibsem.sem.dwell", "between 10 ns and 1 ms"),
    ("slice-thickness-zero", "slice_thickness: 15 nm", "slice_thickness: 0 nm", "fibsem.slice_thickness", "between 2 nm and 500 nm"),
    ("fib-current-in-kV", "fib: {voltage: 30 kV, current: 700 pA}", "fib: {voltage: 30 kV, current: 700 kV}", "fibsem.fib.current", "is a voltage"),
    ("fib-current-too-high", "fib: {voltage: 30 kV, current: 700 pA}", "fib: {voltage: 30 kV, current: 700 nA}", "fibsem.fib.current", "between 1 pA and 100 nA"),
    ("wrong-type", "    line_averaging: 5", "    line_averaging: five", "fibsem.sem.line_averaging", "valid integer"),
    ("negative-timepoint", "timepoints: [2 h, 6 h, 24 h]", "timepoints: [-2 h, 6 h, 24 h]", "timepoints[0]", "must be positive"),
    ("non-increasing-timepoints", "timepoints: [2 h, 6 h, 24 h]", "timepoints: [2 h, 6 h, 4 h]", "timepoints[2]", "increasing order"),
    ("stain-after-timepoint", "channel: \"488\", lead_time: 30 min}", "channel: \"488\", lead_time: -10 min}", "stains[1].lead_time", "added before its timepoint"),
    ("unknown-channel-stain", "marks: lipid_droplets, channel: \"488\"", "marks: lipid_droplets, channel: \"561\"", "stains[1].channel", "unknown channel '561'"),
    ("unknown-channel-zstack", "      - {channel: \"639\", exposure: 100 ms, power_percent: 10}", "      - {channel: \"640\", exposure: 100 ms, power_percent: 10}", "confocal.zstack.channels[2].channel", "unknown channel '640'"),
    ("unknown-grid-label", "{sample: D2, square: 5F,", "{sample: D2, square: 5Z9,", "confocal.targets.items[1].square", "not a square of dish D2"),
    ("unknown-sample", "{sample: D2, square: 5F,", "{sample: D7, square: 5F,", "confocal.targets.items[1].sample", "unknown sample 'D7'"),
    ("duplicate-sample-id", "  - id: D2", "  - id: D1", "samples[1].id", "used twice"),
    ("unknown-objective", "    objective: 63x", "    objective: 100x", "confocal.zstack.objective", "unknown objective '100x'"),
    ("bool-as-quantity", "    pixel_size: 5 nm", "    pixel_size: true", "fibsem.sem.pixel_size", "length with a unit"),
    ("unknown-backend", "    backend: sim-smartsem", "    backend: sim-hitachi", "fibsem.bridge.backend", "sim-smartsem"),
    ("frame-too-small", "    frame: [4096, 3072]", "    frame: [4096, 10]", "fibsem.sem.frame", "between 64 and 32768"),
    ("missing-cfg", "  config: simulator", "  config: missing-microscope.cfg", "confocal.config", "does not exist"),
    ("bad-concentration", "  concentration: 50 ug/mL", "  concentration: 50", "treatment.concentration", "not a concentration with its unit"),
    ("z-step-larger-than-range", "    step: 0.3 um", "    step: 12 um", "confocal.zstack.step", "larger than the z range"),
    ("grid-bar-too-wide", "grid: {name: mattek, pitch: 600 um, bar_width: 40 um}\n  - id: C1", "grid: {name: mattek, pitch: 600 um, bar_width: 400 um}\n  - id: C1", "samples[1].grid", "bar_width"),
]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _line_of(text: str, snippet: str) -> int:
    first = snippet.splitlines()[0]
    for number, line in enumerate(text.splitlines(), start=1):
        if first in line:
            return number
    raise AssertionError(f"{snippet!r} not in text")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_protocol_names_line_and_field(case, tmp_path, cli):
    name, old, new, field, words = case
    assert BASE.count(old) == 1, f"test setup: {old!r} must occur once in the example"
    text = BASE.replace(old, new)
    path = _write(tmp_path, name, text)
    code, output = cli("validate", path)
    assert code == 2, output
    expected_line = BASE[: BASE.index(old)].count("\n") + 1
    pattern = rf"{re.escape(str(path))}:{expected_line}:\d+: {re.escape(field)}:"
    assert re.search(pattern, output), f"expected {pattern!r} in:\n{output}"
    assert words in output, output
    assert "Traceback" not in output


def test_missing_required_field_points_at_its_section(tmp_path, cli):
    text = BASE.replace("  name: clem-uptake-2h-6h-24h\n", "")
    path = _write(tmp_path, "missing", text)
    code, output = cli("validate", path)
    assert code == 2
    assert re.search(rf"{re.escape(str(path))}:{_line_of(text, 'experiment:')}:\d+: experiment.name: missing field 'name'", output), output


def test_yaml_syntax_error_gives_its_line(tmp_path, cli):
    text = BASE.replace("timepoints: [2 h, 6 h, 24 h]", "timepoints: [2 h, 6 h, 24 h")
    path = _write(tmp_path, "syntax", text)
    code, output = cli("validate", path)
    assert code == 2
    match = re.search(rf"{re.escape(str(path))}:(\d+):\d+: YAML syntax error", output)
    assert match, output
    # The parser notices the unclosed bracket at the start of the next mapping key, within two lines.
    assert 0 <= int(match.group(1)) - _line_of(text, "timepoints: [2 h") <= 2


def test_duplicate_key_is_an_error(tmp_path, cli):
    text = BASE.replace("slice_thickness: 15 nm", "slice_thickness: 15 nm\n  slice_thickness: 10 nm")
    path = _write(tmp_path, "dup", text)
    code, output = cli("validate", path)
    assert code == 2
    assert f"{path}:{_line_of(text, 'slice_thickness: 10 nm')}" in output and "duplicate" in output.lower()


@pytest.mark.parametrize("text,words", [("", "empty"), ("- a\n- b\n", "mapping of sections")])
def test_empty_or_list_file(tmp_path, cli, text, words):
    code, output = cli("validate", _write(tmp_path, "odd", text))
    assert code == 2 and words in output


def test_every_problem_is_reported_not_only_the_first(tmp_path, cli):
    text = BASE.replace("    dwell: 2 us", "    dwell: 2").replace("slice_thickness: 15 nm", "slice_thickness: 0 nm")
    code, output = cli("validate", _write(tmp_path, "two", text))
    assert code == 2
    assert "fibsem.sem.dwell" in output and "fibsem.slice_thickness" in output


def test_valid_and_invalid_files_together_exit_2(tmp_path, cli):
    bad = _write(tmp_path, "bad", BASE.replace("    dwell: 2 us", "    dwell: 2"))
    code, output = cli("validate", PROTOCOLS / "clem_2h_6h_24h.yaml", bad)
    assert code == 2
    assert "is valid" in output and "1 of 2" in output


def test_missing_file(tmp_path, cli):
    code, output = cli("validate", tmp_path / "nope.yaml")
    assert code == 2 and "file not found" in output


def test_real_command_exits_2_without_traceback(tmp_path):
    import subprocess
    import sys

    path = _write(tmp_path, "bad", BASE.replace("    dwell: 2 us", "    dwell: 2"))
    result = subprocess.run([sys.executable, "-m", "clemflow", "validate", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "fibsem.sem.dwell" in result.stdout and "Traceback" not in result.stdout + result.stderr
