"""README's tables of every condition and Event reason agree with the enums in the code.

A reason added to ``Reason``, ``ConditionType`` or ``EventReason`` without a row in README's
"Conditions and Events: every reason" section fails here, and so does a row naming a reason the
code no longer has.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from connbudget.model.conditions import STALLED_REASONS, ConditionType, Reason
from connbudget.probe.errors import ProbeFailure
from connbudget.report.events import EventReason

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PACKAGE = ROOT / "operator" / "connbudget"
SECTION = "### Conditions and Events: every reason"
CONDITION_HEADER = ("Condition", "Status", "Reason", "What it means", "What to do")
EVENT_HEADER = ("Reason", "Type", "When", "What to do")
NO_CONDITION = "—"  # in the condition and status cells: a reason no condition carries
STALLED_MARK = "`Stalled=True`"  # starts the meaning of a Ready=False row that stalls the budget
EVENT_TYPES = frozenset({"Normal", "Warning", "Normal or Warning"})
NAME = re.compile(r"`([A-Za-z]+)`")


@dataclass(frozen=True)
class ConditionRow:
    condition: str  # a ConditionType value, or NO_CONDITION
    status: str  # True, False, or NO_CONDITION
    reason: str
    meaning: str
    to_do: str


@dataclass(frozen=True)
class EventRow:
    reason: str
    type: str
    when: str
    to_do: str


def section_lines(text: str) -> list[str]:
    """The lines of the section, up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    assert lines.count(SECTION) == 1, f"README.md needs exactly one {SECTION!r}"
    start = lines.index(SECTION) + 1
    end = next((i for i in range(start, len(lines)) if re.match(r"#{1,3} ", lines[i])), len(lines))
    return lines[start:end]


def tables(lines: list[str]) -> dict[tuple[str, ...], list[tuple[str, ...]]]:
    """Every Markdown table of ``lines``, by its header, with its rows of cells."""
    out: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    block: list[tuple[str, ...]] = []
    for line in [*lines, ""]:
        if line.startswith("|"):
            block.append(tuple(c.strip() for c in line.strip().strip("|").split("|")))
            continue
        if block:
            header, separator, *rows = block
            assert all(set(c) <= {"-", ":"} for c in separator), f"not a table: {header}"
            for row in rows:
                # A "|" inside a cell would shift every cell after it.
                assert len(row) == len(header), f"{len(row)} cells, not {len(header)}: {row}"
            assert header not in out, f"two tables with the header {header}"
            out[header] = rows
            block = []
    return out


def one_name(cell: str) -> str:
    """The one backquoted name a reason or condition cell holds."""
    m = NAME.fullmatch(cell)
    assert m is not None, f"expected one `Name`, got {cell!r}"
    return m.group(1)


@pytest.fixture(scope="module")
def readme_tables() -> dict[tuple[str, ...], list[tuple[str, ...]]]:
    return tables(section_lines(README.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def condition_rows(
    readme_tables: dict[tuple[str, ...], list[tuple[str, ...]]],
) -> list[ConditionRow]:
    assert CONDITION_HEADER in readme_tables, f"no table headed {CONDITION_HEADER}"
    return [
        ConditionRow(
            condition=c if c == NO_CONDITION else one_name(c),
            status=s,
            reason=one_name(r),
            meaning=m,
            to_do=t,
        )
        for c, s, r, m, t in readme_tables[CONDITION_HEADER]
    ]


@pytest.fixture(scope="module")
def event_rows(readme_tables: dict[tuple[str, ...], list[tuple[str, ...]]]) -> list[EventRow]:
    assert EVENT_HEADER in readme_tables, f"no table headed {EVENT_HEADER}"
    return [
        EventRow(reason=one_name(r), type=ty, when=w, to_do=t)
        for r, ty, w, t in readme_tables[EVENT_HEADER]
    ]


def test_every_event_reason_is_listed_exactly_once(event_rows: list[EventRow]) -> None:
    listed = Counter(row.reason for row in event_rows)
    assert {r: n for r, n in listed.items() if n > 1} == {}
    in_code = {r.value for r in EventReason}
    missing_from_readme = in_code - set(listed)
    not_in_the_code = set(listed) - in_code
    assert missing_from_readme == set()
    assert not_in_the_code == set()


def test_every_event_row_says_its_type_when_and_what_to_do(event_rows: list[EventRow]) -> None:
    for row in event_rows:
        assert row.type in EVENT_TYPES, row
        assert row.when, row
        assert row.to_do, row


def test_every_condition_row_names_a_condition_type_and_a_reason_of_the_code(
    condition_rows: list[ConditionRow],
) -> None:
    types = {t.value for t in ConditionType}
    reasons = {r.value for r in Reason}
    for row in condition_rows:
        if row.condition == NO_CONDITION:
            assert row.status == NO_CONDITION, row
        else:
            assert row.condition in types, row
            assert row.status in ("True", "False"), row
        assert row.reason in reasons, row
        assert row.meaning, row
        assert row.to_do, row


def test_every_condition_type_and_every_reason_is_listed(
    condition_rows: list[ConditionRow],
) -> None:
    missing_types = {t.value for t in ConditionType} - {row.condition for row in condition_rows}
    missing_reasons = {r.value for r in Reason} - {row.reason for row in condition_rows}
    assert missing_types == set()
    assert missing_reasons == set()


def test_each_condition_and_reason_pair_is_listed_once(
    condition_rows: list[ConditionRow],
) -> None:
    pairs = Counter((row.condition, row.reason) for row in condition_rows)
    assert {p: n for p, n in pairs.items() if n > 1} == {}


def test_the_stalled_rows_are_exactly_the_stalled_reasons(
    condition_rows: list[ConditionRow],
) -> None:
    stalled = {r.value for r in STALLED_REASONS}
    rows = [row for row in condition_rows if row.condition == ConditionType.STALLED]
    assert {row.reason for row in rows if row.status == "True"} == stalled
    assert {row.reason for row in rows if row.status == "False"} == {Reason.NOT_STALLED.value}
    for row in rows:
        if row.status == "True":
            assert row.meaning.startswith("The budget is stalled"), row


def test_a_ready_row_is_marked_stalled_exactly_for_the_stalled_reasons(
    condition_rows: list[ConditionRow],
) -> None:
    stalled = {r.value for r in STALLED_REASONS}
    not_ready = [
        row
        for row in condition_rows
        if row.condition == ConditionType.READY and row.status == "False"
    ]
    assert stalled <= {row.reason for row in not_ready}
    for row in not_ready:
        assert row.meaning.startswith(STALLED_MARK) == (row.reason in stalled), row


def test_every_probe_failure_has_a_database_reachable_row(
    condition_rows: list[ConditionRow],
) -> None:
    # cycle/observe.py turns a ProbeFailure into the Reason of the same value for Ready and
    # DatabaseReachable; each must exist and be documented there.
    unreachable = {
        row.reason
        for row in condition_rows
        if row.condition == ConditionType.DATABASE_REACHABLE and row.status == "False"
    }
    for failure in ProbeFailure:
        assert Reason(failure.value).value in unreachable, failure


def test_a_reason_listed_without_a_condition_is_not_used_by_the_operator(
    condition_rows: list[ConditionRow],
) -> None:
    # A reason the table says no condition carries must stay unused; once code sets it, its row
    # must name the condition.
    sources = {
        path: path.read_text(encoding="utf-8")
        for path in PACKAGE.rglob("*.py")
        if path != PACKAGE / "model" / "conditions.py"
    }
    carried = {row.reason for row in condition_rows if row.condition != NO_CONDITION}
    for row in condition_rows:
        if row.condition != NO_CONDITION:
            continue
        assert row.reason not in carried, row
        reason = Reason(row.reason)
        assert reason.value not in {f.value for f in ProbeFailure}, row
        for path, text in sources.items():
            assert f"Reason.{reason.name}" not in text, (row, path)
            assert f'"{reason.value}"' not in text, (row, path)
