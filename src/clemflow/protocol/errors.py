"""Problems in protocol files, with the file, line and field that a person must fix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Problem", "ProtocolError"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong in one protocol file."""

    file: Path
    line: int | None  # 1-based
    column: int | None  # 1-based
    field: str  # dotted path, e.g. "fibsem.sem.dwell" or "timepoints[2]"
    message: str

    def __str__(self) -> str:
        where = str(self.file)
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        field = f" {self.field}:" if self.field else ""
        return f"{where}:{field} {self.message}"


class ProtocolError(Exception):
    """A protocol file could not be used; carries every problem found, not only the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))
