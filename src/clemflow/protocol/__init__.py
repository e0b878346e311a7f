"""Protocol files: validated pydantic models of everything a run does.

This package is data: it imports no instrument, engine or consumer.
"""

from .errors import Problem, ProtocolError
from .grid_scheme import MATTEK, GridScheme
from .loader import load_protocol, parse_protocol
from .protocol import Protocol

__all__ = ["MATTEK", "GridScheme", "Problem", "Protocol", "ProtocolError", "load_protocol", "parse_protocol"]
