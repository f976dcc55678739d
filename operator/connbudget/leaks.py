"""``connbudget leaks``: which workloads leak connections, and where in their code.

It reads what the operator already wrote in each ConnectionBudget's status
(``status.usage.byOwner[]``: class, leak rate, abandoned connections, the statements they last ran
and a hint) and never connects to a database. The rendering (``find_owners``, ``render_table``,
``render_json``) is pure: no I/O, no clock, every input an argument. The one API call is
``kube.budgets.read_budgets``, passed in to ``cmd_leaks`` so tests give a fake.

What it prints never holds a literal: statements are printed as the status has them after being
normalised once more (``policy.fingerprint.normalise``), since a status is written by whoever may
patch ``connectionbudgets/status``, not only by this operator. A field an older operator does not
write (``leaks``, ``hint``, ``class``) or writes as null is shown as unknown, never as an error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from connbudget.model.spec import GROUP, PLURAL, VERSION
from connbudget.policy import fingerprint

if TYPE_CHECKING:
    from connbudget.kube.budgets import BudgetList, BudgetsUnreadable

EXIT_OK, EXIT_ERROR = 0, 2
LEAKING = "Leaking"
TOP_LEAKS = 3  # statements shown per owner in the table
STATEMENT_WIDTH = 60  # characters of a statement in the table (cut with "…")
TAGS_WIDTH = 60
MESSAGE_WIDTH = 160  # characters of a condition message in a note
# Phases whose usage is not from a fresh probe: the figures are what the last good one saw.
STALE_PHASES = frozenset({"Degraded", "Pending"})
RESOURCE = f"{PLURAL}.{GROUP}"


@dataclass(frozen=True, kw_only=True)
class Leak:
    """One statement shape an owner's abandoned connections last ran (``byOwner[].leaks[]``)."""

    fingerprint: str
    statement: str  # normalised, never a literal
    tags: Mapping[str, str]
    count: int
    share: float | None  # 0..1; None: not reported
    first_seen: str  # RFC 3339 as the status has it ("" unknown)
    revision: str  # "" unknown


@dataclass(frozen=True, kw_only=True)
class OwnerLeaks:
    """One workload of one budget, as ``connbudget leaks`` shows it."""

    namespace: str
    budget: str
    owner: str
    cls: str | None  # Leaking, Pooling, Steady; None: not judged (or an older operator)
    rate: float  # abandoned connections opened per minute
    abandoned: int
    leaks: tuple[Leak, ...] = ()
    hint: str | None = None
    statements_hidden: bool = False  # StatementsVisible=False: the role cannot read them


@dataclass(frozen=True, kw_only=True)
class Note:
    """A budget whose figures may be old: its phase and why."""

    namespace: str
    budget: str
    phase: str
    reason: str
    message: str


@dataclass(frozen=True, kw_only=True)
class Report:
    owners: list[OwnerLeaks]
    budgets: int
    notes: list[Note] = field(default_factory=list)


# --- reading a status leniently -----------------------------------------------------------------


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _items(value: object) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _text(value: object) -> str:
    """``value`` as one printable line ("" unless a string): no escape reaches the terminal."""
    if not isinstance(value, str):
        return ""
    return "".join(ch for ch in " ".join(value.split()) if ch.isprintable())


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _count(value: object) -> int:
    n = _number(value)
    return max(int(n), 0) if n is not None else 0


def _cut(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return text[: width - 1].rstrip() + fingerprint.ELLIPSIS


def _leak(item: Mapping[str, Any]) -> Leak | None:
    # A statement is normalised again and tags checked again: whoever wrote the status, no
    # literal and no secret-looking tag is printed.
    statement = fingerprint.normalise(_text(item.get("statement")))
    tags = fingerprint.safe_tags(
        {_text(k): _text(v) for k, v in _mapping(item.get("tags")).items() if _text(k) and _text(v)}
    )
    if not statement and not tags:
        return None
    share = _number(item.get("share"))
    return Leak(
        fingerprint=_text(item.get("fingerprint")),
        statement=statement,
        tags=tags,
        count=_count(item.get("count")),
        share=min(max(share, 0.0), 1.0) if share is not None else None,
        first_seen=_text(item.get("firstSeen")),
        revision=_text(item.get("revision")),
    )


def _condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    return next((c for c in _items(status.get("conditions")) if c.get("type") == type_), {})


def find_owners(budgets: Sequence[object], *, all_owners: bool = False) -> Report:
    """Pick the workloads to show from ConnectionBudget objects, fastest leak first.

    Only ``Leaking`` owners unless ``all_owners``. Owners are ordered by leak rate, then abandoned
    connections, then namespace, budget and owner, so the same status always prints the same
    table; an owner's statements by count, most first (ties keep the status's order).

    Args:
        budgets: ConnectionBudgets as the API returns them (anything else is skipped).
        all_owners: show Pooling, Steady and unjudged owners too.

    Returns:
        The owners, how many budgets were read, and a note for each whose figures may be old.
    """
    owners: list[OwnerLeaks] = []
    notes: list[Note] = []
    objects = [_mapping(b) for b in budgets if isinstance(b, Mapping)]
    for obj in objects:
        meta, status = _mapping(obj.get("metadata")), _mapping(obj.get("status"))
        namespace, name = _text(meta.get("namespace")), _text(meta.get("name"))
        phase = _text(status.get("phase"))
        if phase in STALE_PHASES:
            ready = _condition(status, "Ready")
            notes.append(
                Note(
                    namespace=namespace,
                    budget=name,
                    phase=phase,
                    reason=_text(ready.get("reason")),
                    message=_cut(_text(ready.get("message")), MESSAGE_WIDTH),
                )
            )
        hidden = _condition(status, "StatementsVisible").get("status") == "False"
        for item in _items(_mapping(status.get("usage")).get("byOwner")):
            cls = _text(item.get("class")) or None
            if cls != LEAKING and not all_owners:
                continue
            leaks = [leak for leak in map(_leak, _items(item.get("leaks"))) if leak is not None]
            leaks.sort(key=lambda leak: -leak.count)
            owners.append(
                OwnerLeaks(
                    namespace=namespace,
                    budget=name,
                    owner=_text(item.get("owner")) or "-",
                    cls=cls,
                    rate=max(_number(item.get("leakRatePerMinute")) or 0.0, 0.0),
                    abandoned=_count(item.get("abandoned")),
                    leaks=tuple(leaks),
                    hint=_text(item.get("hint")) or None,
                    statements_hidden=hidden,
                )
            )
    owners.sort(key=lambda o: (-o.rate, -o.abandoned, o.namespace, o.budget, o.owner))
    return Report(owners=owners, budgets=len(objects), notes=notes)


# --- rendering ----------------------------------------------------------------------------------


def _tags(tags: Mapping[str, str]) -> str:
    known = [k for k in fingerprint.TAG_KEYS if k in tags]
    others = sorted(k for k in tags if k not in fingerprint.TAG_KEYS)
    return _cut(" ".join(f"{k}={tags[k]}" for k in known + others), TAGS_WIDTH)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def render_table(report: Report, *, namespace: str | None, all_owners: bool = False) -> str:
    """Render the owners as a table, one row per statement (the top ``TOP_LEAKS``).

    An owner's own columns are filled on its first row only; its hint follows on a line of its
    own. The NAMESPACE column is there when listing every namespace (``namespace`` None), CLASS
    with ``all_owners``.

    Args:
        report: what ``find_owners`` picked.
        namespace: the namespace listed; None for every namespace.
        all_owners: whether owners that do not leak were asked for.

    Returns:
        The table (no trailing newline), or one line saying there is nothing to show.
    """
    where = f"namespace {namespace}" if namespace is not None else "any namespace"
    if not report.owners:
        what = "workloads with connections" if all_owners else "leaking workloads"
        lines = [f"no {what} in {where} ({_plural(report.budgets, 'budget')})"]
        return "\n".join(lines + _note_lines(report.notes))
    header = ["NAMESPACE"] if namespace is None else []
    header += ["BUDGET", "OWNER"] + (["CLASS"] if all_owners else [])
    owner_columns = len(header)
    header += ["RATE/MIN", "ABANDONED", "SHARE", "STATEMENT", "TAGS", "REVISION"]
    # A row is a list of cells, or a hint (a str) printed as its own line.
    rows: list[list[str] | str] = []
    for o in report.owners:
        first = [o.namespace] if namespace is None else []
        first += [o.budget, o.owner] + ([o.cls or "-"] if all_owners else [])
        first += [f"{o.rate:.1f}", str(o.abandoned)]
        if not o.leaks:
            unknown = "(hidden: grant pg_read_all_stats)" if o.statements_hidden else "-"
            rows.append([*first, "-", unknown if o.cls == LEAKING else "-", "", ""])
        for i, leak in enumerate(o.leaks[:TOP_LEAKS]):
            lead = first if i == 0 else [""] * (owner_columns + 2)
            rows.append(
                [
                    *lead,
                    f"{leak.share * 100:.0f}%" if leak.share is not None else "-",
                    _cut(leak.statement, STATEMENT_WIDTH) or "-",
                    _tags(leak.tags),
                    leak.revision or "-",
                ]
            )
        if o.hint:
            rows.append(o.hint)
    cells = [header] + [r for r in rows if isinstance(r, list)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    # A hint starts under its owner's name.
    owner_at = header.index("OWNER")
    indent = " " * (sum(widths[:owner_at]) + 2 * owner_at)
    lines = []
    for row in [header, *rows]:
        if isinstance(row, str):
            lines.append(f"{indent}hint: {row}")
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines + _note_lines(report.notes))


def _note_lines(notes: Sequence[Note]) -> list[str]:
    out = []
    for n in notes:
        why = ": ".join(p for p in (n.reason, n.message) if p)
        out.append(
            f"note: {n.namespace}/{n.budget} is {n.phase}"
            + (f" ({why})" if why else "")
            + ", its figures are from its last successful probe"
        )
    return ([""] if out else []) + out


def render_json(report: Report) -> str:
    """Render the owners as a JSON list: namespace, budget, owner, class, leakRatePerMinute,
    abandoned, leaks (as in the status, every statement normalised) and hint."""
    return json.dumps(
        [
            {
                "namespace": o.namespace,
                "budget": o.budget,
                "owner": o.owner,
                "class": o.cls,
                "leakRatePerMinute": o.rate,
                "abandoned": o.abandoned,
                "leaks": [
                    {
                        "fingerprint": leak.fingerprint,
                        "statement": leak.statement,
                        "tags": dict(leak.tags),
                        "count": leak.count,
                        "share": leak.share,
                        "firstSeen": leak.first_seen or None,
                        "revision": leak.revision,
                    }
                    for leak in o.leaks
                ],
                "hint": o.hint,
            }
            for o in report.owners
        ],
        indent=2,
    )


# --- the command --------------------------------------------------------------------------------


class ReadBudgets(Protocol):
    def __call__(
        self,
        *,
        namespace: str | None,
        all_namespaces: bool,
        kubeconfig: str | None = None,
        context: str | None = None,
    ) -> BudgetList: ...


def advice(error: BudgetsUnreadable) -> str:
    """One line saying what failed and what to do about it."""
    from connbudget.kube.budgets import Problem

    detail = _cut(_text(error.detail), 200)
    where = f"namespace {error.namespace}" if error.namespace else "every namespace"
    texts: Mapping[Problem, Callable[[], str]] = {
        Problem.NO_CONFIG: lambda: (
            f"no usable kubeconfig ({detail}): pass --kubeconfig FILE (and --context NAME), "
            "or set $KUBECONFIG"
        ),
        Problem.UNREACHABLE: lambda: (
            f"cannot reach the API server ({detail}): check that the cluster is up and that "
            "--context (or the current context) names it"
        ),
        Problem.UNAUTHORIZED: lambda: (
            f"the API server rejected the credentials ({detail}): log in again or refresh the "
            "kubeconfig's token"
        ),
        Problem.FORBIDDEN: lambda: (
            f"not allowed to list {RESOURCE} in {where} ({detail}): ask for get and list on "
            f"{RESOURCE}"
            + (" there" if error.namespace else ", or use -n NAMESPACE for one you can read")
        ),
        Problem.NOT_SERVED: lambda: (
            f"this cluster does not serve {RESOURCE}/{VERSION} ({detail}): install the CRD "
            "(kubectl apply -f crds/) or pick the right cluster with --context"
        ),
        Problem.FAILED: lambda: f"listing {RESOURCE} in {where} failed: {detail}",
    }
    return texts[error.problem]()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``connbudget leaks`` to its subparser."""
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", "-n", help="the budgets of this namespace (default: the context's)"
    )
    scope.add_argument(
        "--all-namespaces", "-A", action="store_true", help="the budgets of every namespace"
    )
    parser.add_argument(
        "--all-owners", action="store_true", help="show workloads that do not leak too"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--kubeconfig", metavar="FILE", help="kubeconfig file (default: $KUBECONFIG)"
    )
    parser.add_argument(
        "--context", metavar="NAME", help="kubeconfig context (default: the current one)"
    )


def cmd_leaks(args: argparse.Namespace, *, read: ReadBudgets | None = None) -> int:
    """Run ``connbudget leaks``: list budgets, print their leaking workloads.

    Args:
        args: the parsed command line (see ``add_arguments``).
        read: lists the budgets; None for ``kube.budgets.read_budgets`` (tests pass a fake).

    Returns:
        0, or 2 when the budgets could not be read (one line on stderr says what to do).
    """
    from connbudget.kube import budgets

    reader: ReadBudgets = read or budgets.read_budgets
    try:
        listed = reader(
            namespace=args.namespace,
            all_namespaces=args.all_namespaces,
            kubeconfig=args.kubeconfig,
            context=args.context,
        )
    except budgets.BudgetsUnreadable as e:
        print(f"connbudget leaks: {advice(e)}", file=sys.stderr)
        return EXIT_ERROR
    report = find_owners(listed.items, all_owners=args.all_owners)
    if args.json:
        print(render_json(report))
    else:
        print(render_table(report, namespace=listed.namespace, all_owners=args.all_owners))
    return EXIT_OK
