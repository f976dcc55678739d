"""What happened to each request, classified from the database error, and counted from a log.

Every app (``sandbox.apps``) logs one JSON line per request with ``event`` ``request`` and an
``outcome``; the HTTP driver logs one per request it sent with ``event`` ``sent``. Outcomes:

- ``ok``: every query of the request answered;
- ``refused``: a new connection was refused (``too many clients``, reserved slots);
- ``terminated``: the request's first query found its pooled, idle connection dead (terminated
  by an administrator or a timeout, the server gone): damage done to a well-behaved app;
- ``inflight_broken``: the connection died between two queries of one request;
- ``abandoned``: (driver only) the client hung up before the answer, on purpose;
- ``error``: anything else (another database error, an HTTP failure).

Only the matched phrase is ever logged as ``reason``, never the server's whole message, so no DSN,
password or SQL text reaches a log.
"""

from __future__ import annotations

import json
from collections import Counter

OUTCOMES = ("ok", "refused", "terminated", "inflight_broken", "abandoned", "error")
FAILURES = ("refused", "terminated", "inflight_broken", "error")

REFUSED_PHRASES = (
    "too many clients",
    "remaining connection slots are reserved",
    "connection slots are reserved",
    "no more connections allowed",  # PgBouncer's max_client_conn
)
TERMINATED_PHRASES = (
    "terminating connection due to administrator command",
    "terminating connection due to idle-session timeout",
    "terminating connection due to idle-in-transaction timeout",
    "server closed the connection unexpectedly",
    "consuming input failed",
    "connection already closed",
    "the connection is closed",
    "the connection is lost",
    "could not receive data from server",
    "could not send data to server",
    "connection was closed in the middle of operation",
    "ssl syscall error: eof detected",
    # node-postgres: a socket closed under a client, and a client used after that
    "connection terminated unexpectedly",
    "connection error and is not queryable",
)


def classify(message: str, *, in_flight: bool) -> tuple[str, str]:
    """``(outcome, reason)`` for a database error's message.

    ``in_flight`` says that an earlier query of the same request had already answered on this
    connection, so a dead connection broke a request in the middle.
    """
    text = message.lower()
    for phrase in REFUSED_PHRASES:
        if phrase in text:
            return "refused", phrase
    for phrase in TERMINATED_PHRASES:
        if phrase in text:
            return ("inflight_broken" if in_flight else "terminated"), phrase
    return "error", ""


def classify_exception(exc: BaseException, *, in_flight: bool) -> tuple[str, str]:
    """Classify ``exc`` and the exceptions it was raised from (Django and SQLAlchemy wrap
    psycopg's)."""
    seen: list[str] = []
    e: BaseException | None = exc
    while e is not None and len(seen) < 5:
        seen.append(str(e))
        e = e.__cause__ or e.__context__
    return classify("\n".join(seen), in_flight=in_flight)


def request_lines(log_text: str, event: str = "request") -> list[dict[str, object]]:
    """The JSON lines of ``log_text`` whose ``event`` is ``event`` (other lines are skipped)."""
    found: list[dict[str, object]] = []
    for line in log_text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and item.get("event") == event and "outcome" in item:
            found.append(item)
    return found


def count_outcomes(log_text: str, event: str = "request") -> dict[str, int]:
    """Requests per outcome in a pod's log: every name of ``OUTCOMES`` is a key (0 if none).

    ``event`` is ``request`` for an app's log (``Sandbox.pod_log(ns, pod, "app")``) and ``sent``
    for the driver's (``Sandbox.pod_log(ns, pod, "driver")``).
    """
    counts = Counter(str(item["outcome"]) for item in request_lines(log_text, event))
    return {name: counts.get(name, 0) for name in OUTCOMES} | dict(counts)


def failures(counts: dict[str, int]) -> int:
    """Requests that failed, from ``count_outcomes``' answer."""
    return sum(counts.get(name, 0) for name in FAILURES)
