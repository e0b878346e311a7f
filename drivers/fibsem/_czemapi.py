"""The real CZEMApi COM control, made to look like the shape the SmartSEM driver uses.

Through pywin32 the control's ``Get`` takes its value as a by-reference
argument (pass a placeholder, receive ``(code, value)``) and ``Set`` wants a
typed VARIANT (numbers as 4-byte floats, states as strings). This adapter
hides that, so ``SmartSEMBackend`` reads the same against the look-alike and
the microscope. It only runs on the SmartSEM PC and is untested elsewhere.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CZEMApi"]


class CZEMApi:
    """``Get(name) -> (code, value)``, ``Set(name, value) -> code``, ``Execute``, ``Grab``, over the COM control."""

    def __init__(self, control: Any) -> None:
        import pythoncom  # type: ignore[import-not-found]
        from win32com.client import VARIANT  # type: ignore[import-not-found]

        self._control = control
        self._variant = VARIANT
        self._pythoncom = pythoncom

    def InitialiseRemoting(self) -> int:  # noqa: N802 - the vendor's names
        return int(self._control.InitialiseRemoting())

    def ClosingControl(self) -> int:  # noqa: N802
        return int(self._control.ClosingControl())

    def Get(self, name: str) -> tuple[int, Any]:  # noqa: N802
        placeholder: Any = "" if name.startswith("DP_") else 0.0
        code, value = self._control.Get(name, placeholder)
        return int(code), value

    def Set(self, name: str, value: Any) -> int:  # noqa: N802
        if isinstance(value, str):
            variant = self._variant(self._pythoncom.VT_BSTR, value)
        else:
            variant = self._variant(self._pythoncom.VT_R4, float(value))
        return int(self._control.Set(name, variant))

    def Execute(self, command: str) -> int:  # noqa: N802
        return int(self._control.Execute(command))

    def Grab(self, x: int, y: int, width: int, height: int, reduction: int, path: str) -> int:  # noqa: N802
        return int(self._control.Grab(x, y, width, height, reduction, path))
