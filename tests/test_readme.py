"""The README opens with the two commands a newcomer runs, and CI runs the second one."""

from __future__ import annotations

from conftest import REPO


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.index("```bash") < text.index("##"), "the commands come before any section"
    install_demo, install_test = _readme_commands()
    assert install_demo.endswith("clemflow demo")
    assert "pytest" in install_test


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    _, install_test = _readme_commands()
    assert install_test in ci
