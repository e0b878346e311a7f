"""The ``clemflow`` command line: one typer app, sub-commands in sibling modules."""

from __future__ import annotations

from .app import app, main

__all__ = ["app", "main"]
