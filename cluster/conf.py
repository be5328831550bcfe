"""Typed loading of plain data into dataclasses through omegaconf, with one-line errors.

Shared by every layer that reads YAML: the error names the full key (with list indices)
and the file it came from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cluster.errors import UserError

T = TypeVar("T")


def number_problem(value: float, low: float, strict: bool = False) -> str | None:
    """What is wrong with a number that must be finite and ``>= low`` (``> low`` when
    ``strict``), or None: NaN and infinities pass a plain comparison the wrong way."""
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if value < low or (strict and value == low):
        return f"must be {'>' if strict else '>='} {low:g}, got {value}"
    return None


def load_yaml_file(path: Path, what: str, error: type[UserError]) -> Any:
    """A YAML file as omegaconf reads it, or one ``error`` line: not found, a directory, not
    a mapping, or its syntax error with line and column (a duplicated key named by its path)."""
    if path.is_dir():
        raise error(f"{what} {path} is a directory; give a YAML file")
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {yaml_error_line(e, path)}") from e
    except (ValueError, OSError) as e:  # omegaconf: a scalar at the top; bytes that are not text
        raise error(f"{path}: expected a mapping of keys, got {str(e).strip().splitlines()[0]}") from e
    if not OmegaConf.is_dict(raw) or not raw:
        raise error(f"{path}: expected a mapping of keys, got {'nothing' if not raw else 'a list'}")
    return raw


def yaml_error_line(e: yaml.YAMLError, path: Path | None = None) -> str:
    """What a YAML error says, on one line, with line and column: a duplicated key is named
    by its full path (``train.steps``)."""
    problem = getattr(e, "problem", None)
    if problem is None:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "duplicate key" in problem and path is not None:
        dup = duplicate_key(path.read_text(encoding="utf-8", errors="replace"))
        if dup is not None:
            return f"duplicate key '{dup[0]}' (line {dup[1]}); each key may appear once in a mapping"

    def at(mark: Any) -> str:
        return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""

    context = getattr(e, "context", None)
    before = f"{context}{at(getattr(e, 'context_mark', None))}: " if context else ""
    return f"{before}{problem}{at(getattr(e, 'problem_mark', None))}"


def duplicate_key(text: str) -> tuple[str, int] | None:
    """The full path and line of the first key that appears twice in one mapping of ``text``
    (YAML's loader reports only the bare key)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None

    def walk(node: Any, prefix: str) -> tuple[str, int] | None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in node.value:
                name = str(k.value)
                path = f"{prefix}.{name}" if prefix else name
                if name in seen:
                    return path, k.start_mark.line + 1
                seen.add(name)
                found = walk(v, path)
                if found:
                    return found
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                found = walk(item, f"{prefix}[{i}]")
                if found:
                    return found
        return None

    return walk(root, "")


def conf_error_line(e: OmegaConfBaseException, prefix: str, source: str) -> str:
    """One line naming the key (``prefix`` + omegaconf's key) and the source of an error."""
    key = getattr(e, "full_key", None) or ""
    key = ".".join(k for k in (prefix, str(key)) if k)
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "full_key:" in msg:
        msg = msg.split("full_key:")[0].strip()
    where = f"{source}: " if source else ""
    return f"{where}{key + ': ' if key else ''}{msg}"


def to_typed(cls: type[T], data: Any, *, prefix: str, source: str, error: type[UserError]) -> T:
    """Merge ``data`` over the structured schema of ``cls`` and return the dataclass object."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), data if data is not None else {})
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise error(conf_error_line(e, prefix, source)) from e
