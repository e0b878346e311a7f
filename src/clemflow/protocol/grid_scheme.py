"""The etched grid of a gridded coverslip, as data.

Dishes differ (MatTek, ibidi, home-made finder grids), so the layout is a
value in the protocol, never code. Everything that needs grid geometry (the
simulated specimen, grid finding in light and electron images, relocation)
reads it from here.

Grid frame: µm, seen from above with the glyphs upright; x to the right, y
down; the centre of the bar left of and above the first square is at (0, 0).
Square (column c, row r) has its clear area between
``c * pitch + bar / 2`` and ``(c + 1) * pitch - bar / 2`` in x, and likewise in y.
"""

from __future__ import annotations

from functools import cached_property

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .units import Length

__all__ = ["GridScheme", "MATTEK"]

_MATTEK_COLUMNS = "0123456789abcdefghijk"
_MATTEK_ROWS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class GridScheme(BaseModel):
    """Pitch, bar width and label layout of a gridded coverslip."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    name: str = Field("mattek", description="Name of the grid, for the record.")
    pitch: Length = Field("600 um", description="Centre-to-centre distance of neighbouring bars, e.g. '600 um'.")
    bar_width: Length = Field("40 um", description="Width of an etched bar, e.g. '40 um'.")
    columns: str = Field(
        _MATTEK_COLUMNS, description="One character per column, left to right as seen with glyphs upright."
    )
    rows: str = Field(_MATTEK_ROWS, description="One character per row, top to bottom as seen with glyphs upright.")
    label_height: Length = Field("120 um", description="Height of the etched label characters, e.g. '120 um'.")
    label_order: str = Field(
        "column-row", description="'column-row' labels a square e.g. '3C'; 'row-column' labels it 'C3'."
    )

    @field_validator("pitch")
    @classmethod
    def _pitch_plausible(cls, value: float) -> float:
        if not 20e-6 <= value <= 5e-3:
            raise ValueError("grid pitch must lie between 20 um and 5 mm")
        return value

    @field_validator("columns", "rows")
    @classmethod
    def _unique_characters(cls, value: str) -> str:
        if not value:
            raise ValueError("needs at least one character")
        if len(set(value)) != len(value):
            raise ValueError(f"characters must be unique, {value!r} repeats some")
        return value

    @field_validator("label_order")
    @classmethod
    def _known_order(cls, value: str) -> str:
        if value not in ("column-row", "row-column"):
            raise ValueError("label_order must be 'column-row' or 'row-column'")
        return value

    @model_validator(mode="after")
    def _bar_narrower_than_pitch(self) -> "GridScheme":
        if not 0 < self.bar_width < self.pitch / 2:
            raise ValueError("bar_width must be positive and less than half the pitch")
        return self

    # -- geometry -----------------------------------------------------------

    @property
    def pitch_um(self) -> float:
        return self.pitch * 1e6

    @property
    def bar_width_um(self) -> float:
        return self.bar_width * 1e6

    @property
    def label_height_um(self) -> float:
        return self.label_height * 1e6

    @property
    def shape(self) -> tuple[int, int]:
        """(number of columns, number of rows)."""
        return len(self.columns), len(self.rows)

    def label(self, column: int, row: int) -> str:
        """The label etched in square (column, row)."""
        if not (0 <= column < len(self.columns) and 0 <= row < len(self.rows)):
            raise IndexError(f"square ({column}, {row}) is outside the {self.name} grid")
        c, r = self.columns[column], self.rows[row]
        return c + r if self.label_order == "column-row" else r + c

    @cached_property
    def _index(self) -> dict[str, tuple[int, int]]:
        return {self.label(c, r): (c, r) for c in range(len(self.columns)) for r in range(len(self.rows))}

    @property
    def labels(self) -> list[str]:
        return list(self._index)

    def has_label(self, label: str) -> bool:
        return label in self._index

    def square_of(self, label: str) -> tuple[int, int]:
        """(column, row) of a label; KeyError naming the scheme when it does not exist."""
        try:
            return self._index[label]
        except KeyError:
            raise KeyError(
                f"{label!r} is not a square of the {self.name} grid "
                f"(columns {self.columns!r}, rows {self.rows!r}, order {self.label_order})"
            ) from None

    def square_center_um(self, label: str) -> tuple[float, float]:
        """Centre of a square in the grid frame, µm."""
        column, row = self.square_of(label)
        return (column + 0.5) * self.pitch_um, (row + 0.5) * self.pitch_um

    def square_at_um(self, x_um: float, y_um: float) -> tuple[int, int] | None:
        """(column, row) of the square whose cell of the lattice contains a point, or None off the grid."""
        column, row = int(x_um // self.pitch_um), int(y_um // self.pitch_um)
        if 0 <= column < len(self.columns) and 0 <= row < len(self.rows):
            return column, row
        return None

    def on_bar(self, x_um: float, y_um: float) -> bool:
        """True where a point lies on an etched bar."""
        half = self.bar_width_um / 2
        fx = x_um % self.pitch_um
        fy = y_um % self.pitch_um
        return min(fx, self.pitch_um - fx) < half or min(fy, self.pitch_um - fy) < half


MATTEK = GridScheme()
"""MatTek gridded glass-bottom dish: 600 µm pitch, 40 µm bars, 21 x 26 squares."""
