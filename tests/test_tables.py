"""The one table renderer (cluster/tables.py): plain text off a terminal, rich's boxes on one."""

from __future__ import annotations

import re

import pytest

from cluster.tables import render_table

HEAD = ("stage", "device", "params", "note")
ROWS = [("0", "edge-phone", "180,736", "[bold]not markup[/]"), ("12", "home-server", "5", "")]
BOX = re.compile("[\u2500-\u257f]")  # box-drawing characters
ANSI = re.compile("\x1b\\[")


def test_plain_text_is_aligned_with_a_header_a_rule_and_no_codes():
    text = render_table(HEAD, ROWS, numeric=("stage", "params"), total=("", "total", "180,741", ""), terminal=False)
    lines = text.splitlines()
    assert lines == [
        "stage  device        params  note",
        "------ ------------ -------- -------------------",
        "    0  edge-phone   180,736  [bold]not markup[/]",
        "   12  home-server        5",
        "------ ------------ -------- -------------------",
        "       total        180,741",
    ]
    assert not BOX.search(text) and not ANSI.search(text)


def test_plain_text_never_wraps_or_cuts_a_cell(monkeypatch):
    monkeypatch.setenv("COLUMNS", "20")  # neither the environment's width
    monkeypatch.setenv("FORCE_COLOR", "1")  # nor its colour settings change plain text
    long = "x" * 300
    text = render_table(("a", "b"), [("1", long), ("2", "y")], terminal=False)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[2] == f"1  {long}" and lines[3] == "2  y"
    assert not ANSI.search(text)


def test_default_is_plain_when_stdout_is_not_a_terminal(capsys):
    assert render_table(HEAD, ROWS) == render_table(HEAD, ROWS, terminal=False)  # pytest captures stdout


def test_terminal_gets_rich_boxes_with_numbers_right_aligned(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    monkeypatch.setenv("NO_COLOR", "1")
    text = render_table(HEAD, ROWS, numeric=("stage", "params"), terminal=True)
    assert BOX.search(text)
    row = next(line for line in text.splitlines() if "home-server" in line)
    cells = re.split("[\u2502\u2503]", row)[1:-1]
    assert cells[0] == "    12 " and cells[2] == "       5 " and cells[1].startswith(" home-server")


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="numeric columns not in the header: size"):
        render_table(HEAD, ROWS, numeric=("size",), terminal=False)
    with pytest.raises(ValueError, match="a row has 2 cells for 4 columns"):
        render_table(HEAD, [("1", "2")], terminal=False)
