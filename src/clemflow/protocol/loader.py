"""Read protocol files, and turn every mistake into a Problem with its file, line and field.

ruamel.yaml's round-trip loader keeps the line and column of every key and
value; pydantic reports the field path of every error; this module joins the
two so that a person is told "clem.yaml:41:12: fibsem.sem.dwell: ..." instead of
a traceback.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from .errors import Problem, ProtocolError
from .protocol import CrossReferenceErrors, Protocol

__all__ = ["load_model", "load_protocol", "parse_protocol", "read_yaml"]

Loc = tuple[str | int, ...]
M = typing.TypeVar("M", bound=BaseModel)


def load_protocol(path: str | Path) -> Protocol:
    """Load and validate a protocol file; raise ProtocolError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProtocolError([Problem(path, None, None, "", "file not found; check the path")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProtocolError([Problem(path, None, None, "", f"cannot be read: {exc}")]) from None
    return parse_protocol(text, path)


def read_yaml(text: str, path: Path) -> CommentedMap:
    """Parse YAML text keeping positions; a syntax error becomes a Problem at its line."""
    yaml = YAML(typ="rt")
    try:
        document = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        column = mark.column + 1 if mark else None
        reason = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise ProtocolError([Problem(path, line, column, "", f"YAML syntax error: {reason}")]) from None
    except YAMLError as exc:
        raise ProtocolError([Problem(path, None, None, "", f"YAML error: {exc}")]) from None
    if document is None:
        raise ProtocolError([Problem(path, 1, 1, "", "the file is empty; start from one of the examples in protocols/")])
    if not isinstance(document, CommentedMap):
        raise ProtocolError(
            [Problem(path, 1, 1, "", "a protocol is a mapping of sections (experiment:, samples:, ...), not a list or a value")]
        )
    return document


def parse_protocol(text: str, path: str | Path = "<protocol>") -> Protocol:
    """Validate protocol text; `path` is only used in messages and to resolve relative files."""
    path = Path(path)
    document = read_yaml(text, path)
    try:
        protocol = Protocol.model_validate(_plain(document))
    except ValidationError as exc:
        raise ProtocolError(_problems(exc, document, path)) from None
    file_problems = list(_check_files(protocol, path, document))
    if file_problems:
        raise ProtocolError(file_problems)
    return protocol


def _plain(node: Any) -> Any:
    """ruamel's round-trip containers and scalars as plain Python values."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, bool) or node is None:
        return node
    for kind in (int, float, str):
        if isinstance(node, kind):
            return kind(node)
    return node


def load_model(path: str | Path, model: type[M]) -> M:
    """Load any protocol-style model (e.g. a GridScheme file) with the same line-numbered errors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProtocolError([Problem(path, None, None, "", f"cannot be read: {exc}")]) from None
    document = read_yaml(text, path)
    try:
        return model.model_validate(_plain(document))
    except ValidationError as exc:
        raise ProtocolError(_problems(exc, document, path, model)) from None


def _problems(
    exc: ValidationError, document: CommentedMap, path: Path, root: type[BaseModel] = Protocol
) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[Loc, str]] = set()
    for error in exc.errors():
        for loc, message in _expand(error, root):
            if (loc, message) in seen:
                continue
            seen.add((loc, message))
            line, column = _position(document, loc)
            problems.append(Problem(path, line, column, _dotted(loc), message))
    return sorted(problems, key=lambda p: (p.line or 0, p.column or 0))


def _expand(error: dict[str, Any], root: type[BaseModel]) -> Iterable[tuple[Loc, str]]:
    loc: Loc = tuple(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, CrossReferenceErrors):
        for sub_loc, message in cause.problems:
            yield loc + tuple(sub_loc), message
        return
    yield loc, _message(error, loc, root)


def _message(error: dict[str, Any], loc: Loc, root: type[BaseModel]) -> str:
    kind = error["type"]
    message = error["msg"]
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    if kind == "assertion_error":
        return message.removeprefix("Assertion failed, ")
    if kind == "extra_forbidden":
        name = str(loc[-1])
        allowed = _fields_at(loc[:-1], root)
        hint = ""
        close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
        if close:
            hint = f"; did you mean {close[0]!r}?"
        if allowed:
            hint += f" Fields here: {', '.join(allowed)}"
        return f"unknown field {name!r}{hint}"
    if kind == "missing":
        return f"missing field {str(loc[-1])!r}; it is required here"
    value = error.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return f"{message[0].lower()}{message[1:]}, got {shown}"


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _position(document: CommentedMap, loc: Loc) -> tuple[int | None, int | None]:
    """1-based line and column of the deepest YAML node on `loc` (the key, for a value error)."""
    node: Any = document
    line, column = 1, 1
    parts = list(loc)
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if isinstance(node, CommentedMap) and part in node:
            key_line, key_col = node.lc.key(part)
            value_line, value_col = node.lc.value(part)
            child = node[part]
            # Point at the value when it is a scalar on the key's line, else at the key.
            if last and not isinstance(child, (CommentedMap, CommentedSeq)):
                line, column = value_line + 1, value_col + 1
            else:
                line, column = key_line + 1, key_col + 1
            node = child
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            item_line, item_col = node.lc.item(part)
            line, column = item_line + 1, item_col + 1
            node = node[part]
        else:
            break  # the field is missing or the value is not a container: point at its parent
    return line, column


def _fields_at(loc: Loc, root: type[BaseModel] = Protocol) -> list[str]:
    """Names of the fields accepted by the model at a path (for 'did you mean')."""
    model: Any = root
    for part in loc:
        model = _unwrap(model)
        if isinstance(part, int):
            continue
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            model = model.model_fields[part].annotation
        else:
            return []
    model = _unwrap(model)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """The model class inside Optional[...], list[...], tuple[...] or Annotated[...]."""
    for _ in range(5):
        origin = typing.get_origin(annotation)
        if origin is None:
            return annotation
        args: Sequence[Any] = [a for a in typing.get_args(annotation) if a is not type(None)]
        if origin is typing.Annotated:
            annotation = args[0]
        elif origin in (typing.Union, types.UnionType, list, tuple, dict):
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            annotation = models[0] if models else (args[-1] if args else annotation)
        else:
            return annotation
    return annotation


def _check_files(protocol: Protocol, path: Path, document: CommentedMap) -> Iterable[Problem]:
    """Files the protocol names must exist before anything starts."""
    confocal = protocol.confocal
    if confocal is not None and confocal.config != "simulator":
        cfg = Path(confocal.config)
        if not cfg.is_absolute():
            cfg = path.parent / cfg
        if not cfg.is_file():
            loc: Loc = ("confocal", "config")
            line, column = _position(document, loc)
            yield Problem(
                path, line, column, _dotted(loc),
                f"Micro-Manager configuration {str(cfg)!r} does not exist; give the path of your .cfg "
                "(relative to the protocol file) or 'simulator'",
            )
    stack = protocol.correlation.lm_stack
    if stack is not None:
        lm = Path(stack) if Path(stack).is_absolute() else path.parent / stack
        if not lm.is_file():
            loc = ("correlation", "lm_stack")
            line, column = _position(document, loc)
            yield Problem(
                path, line, column, _dotted(loc),
                f"confocal stack {str(lm)!r} does not exist; give the OME-TIFF of the target cell (relative to the "
                "protocol file), or leave lm_stack out to run without the online check",
            )
