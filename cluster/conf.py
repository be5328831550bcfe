"""Typed loading of plain data into dataclasses through omegaconf, with one-line errors.

Shared by every layer that reads YAML: the error names the full key (with list indices)
and the file it came from.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

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
