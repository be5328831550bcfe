"""Tables for people and for logs: the one table renderer of every layer.

A shared bottom-layer helper: it lives in ``cluster``, the lowest layer that prints a table
(``cluster check``, ``jobs list``), so that ``partitioners`` (the plan, the schedule grid)
and ``splitlearn`` (profiles, partitioner comparisons) use it without importing upward.

A table is built once as a :class:`rich.table.Table` and rendered by a
:class:`rich.console.Console` in one of two ways:

- stdout is a terminal: rich's box, a bold header, numeric columns right-aligned, cells
  folded (never cut) to the terminal's width;
- anything else (pipes, files, Ray job logs, tests, CI): plain text. A header row, a rule of
  ``-`` under each column, columns two spaces apart, numeric columns right-aligned, a rule
  before a ``total`` row; no ANSI codes, no box-drawing characters, no trailing spaces. The
  console is exactly as wide as the content, so no cell is ever wrapped or cut and a row is
  one line: ``line.startswith(first_cell)`` finds it. For example::

      stage  device       params
      ------ ------------ -------
          0  edge-phone   180,736
          1  home-server  295,424

The renderer returns a string (its callers print it, or put it in a report).
"""

from __future__ import annotations

import io
import shutil
import sys
from collections.abc import Collection, Iterable, Sequence

from rich.box import Box
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Plain text as a rich box: blank edges and column dividers, '-' for the rule under the
# header and before a total row. Lines: top, head, head_row, mid, row, foot_row, foot, bottom.
PLAIN_BOX = Box("    \n    \n -  \n    \n -  \n -  \n    \n    \n", ascii=True)


def stdout_is_terminal() -> bool:
    """Whether ``sys.stdout`` is a terminal (``False`` when it is missing or closed)."""
    try:
        return bool(sys.stdout is not None and sys.stdout.isatty())
    except (AttributeError, ValueError):
        return False


def render_table(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    numeric: Collection[str] = (),
    total: Sequence[str] | None = None,
    terminal: bool | None = None,
) -> str:
    """Render ``rows`` (one string per column, ``len(header)`` each) under ``header``.

    ``numeric`` names the header's columns to right-align; ``total`` is a last row set off
    by a rule. ``terminal``: rich's boxes for a terminal (``True``) or plain text
    (``False``); by default, whichever ``sys.stdout`` is. Cells are text, never markup.
    """
    unknown = set(numeric) - set(header)
    if unknown:
        raise ValueError(f"numeric columns not in the header: {', '.join(sorted(unknown))}")
    body = [tuple(r) for r in rows]
    if total is not None:
        body.append(tuple(total))
    for r in body:
        if len(r) != len(header):
            raise ValueError(f"a row has {len(r)} cells for {len(header)} columns: {r}")
    if terminal is None:
        terminal = stdout_is_terminal()

    if terminal:
        table = Table(header_style="bold")
    else:
        # collapse_padding: one space right of each cell plus the blank divider = two spaces
        table = Table(
            box=PLAIN_BOX, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True, header_style=""
        )
    for name in header:
        table.add_column(
            Text(name), justify="right" if name in numeric else "left", no_wrap=not terminal, overflow="fold"
        )
    last = len(body) - (total is not None)
    for i, r in enumerate(body):
        table.add_row(*(Text(str(c)) for c in r), end_section=total is not None and i == last - 1)

    out = io.StringIO()
    if terminal:
        width = shutil.get_terminal_size().columns
        Console(file=out, width=width, force_terminal=True, legacy_windows=False).print(table)
        return out.getvalue().rstrip("\n")
    width = _plain_console(io.StringIO(), 1 << 20).measure(table).maximum
    _plain_console(out, max(width, 1)).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


def _plain_console(file: io.StringIO, width: int) -> Console:
    """A console that writes plain text whatever the environment (FORCE_COLOR, COLUMNS)."""
    return Console(
        file=file,
        width=width,
        color_system=None,
        force_terminal=False,
        no_color=True,
        legacy_windows=False,
        emoji=False,
    )
