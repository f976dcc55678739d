"""PostgreSQL probe: one long-lived monitoring connection per database, reused by every budget.

Talks to PostgreSQL through psycopg 3 (async). Raises ``ProbeError`` with a redacted message.

Why long-lived: when a leak has filled the server, a new connection is refused like everyone
else's; a connection opened before keeps working, so the operator still sees and acts. Why one per
database: the operator must not become a leak itself, however many budgets point at a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg import conninfo
from psycopg.abc import Buffer
from psycopg.adapt import Loader

from connbudget.model.actions import IdleBackend, Termination
from connbudget.model.observations import (
    PROBE_APPLICATION_NAME,
    LastStatement,
    ServerSample,
)
from connbudget.probe import backends, queries
from connbudget.probe.errors import ProbeError, ProbeFailure

CONNECT_TIMEOUT_SECONDS = 5
STATEMENT_TIMEOUT_MS = 5000  # a probe that takes longer than this is a failed probe
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
# A query with no answer, not even the server's own statement_timeout, within this many seconds
# means the server or the network is gone (a partition, a hung host): the connection is given up.
ANSWER_TIMEOUT_SECONDS = STATEMENT_TIMEOUT_MS / 1000 + 2.0
T = TypeVar("T")
# Given-up queries still finishing their cancellation (kept referenced until they end).
_ABANDONED: set[asyncio.Future[Any]] = set()
# Never let a server-wide idle_session_timeout close the monitoring connection; every digit of a
# float8 (the sample's times travel as epoch seconds, some inside json), whatever the server's
# extra_float_digits.
PROBE_OPTIONS = (
    f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c idle_session_timeout=0 -c extra_float_digits=3"
)


def _forget(task: asyncio.Future[Any]) -> None:
    _ABANDONED.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a given-up query's error is of no interest any more


async def answer_within(aw: Awaitable[T], seconds: float) -> T:
    """Await ``aw`` at most ``seconds``; then raise ``TimeoutError`` at once.

    Cancelling a psycopg query makes psycopg ask the server to cancel it and wait for that too:
    against a silent server that is seconds more. The cancelled query finishes in the background.
    """
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if task in done:
        return task.result()
    task.cancel()
    _ABANDONED.add(task)
    task.add_done_callback(_forget)
    raise TimeoutError(f"no answer from the server within {seconds:.0f}s")


async def _query(
    conn: psycopg.AsyncConnection[Any], query: LiteralString, params: dict[str, Any] | None
) -> list[tuple[Any, ...]]:
    try:
        cur = await conn.execute(query, params)
        return await cur.fetchall()
    except asyncio.CancelledError:
        # Given up (no answer in time): this connection is never used again.
        await conn.close()
        raise


def dsn_key(dsn: str, ca_pem: str | None = None) -> str:
    """A stable, non-reversible name for a DSN (for logs, metrics and pooling; never the DSN)."""
    text = dsn if ca_pem is None else f"{dsn}\0{ca_pem}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextlib.contextmanager
def ca_file(ca_pem: str | None) -> Iterator[str | None]:
    """The CA certificate in a file only this process can read, for libpq's ``sslrootcert``.

    libpq reads the file while it connects; it is removed as soon as the connection is made.
    """
    if ca_pem is None:
        yield None
        return
    fd, path = tempfile.mkstemp(prefix="connbudget-ca-", suffix=".pem")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(ca_pem if ca_pem.endswith("\n") else ca_pem + "\n")
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def tls_options(dsn: str, ca_path: str | None) -> dict[str, Any]:
    """Connection options that make libpq verify the server with the CA at ``ca_path``.

    A CA given without an ``sslmode`` in the DSN means verify-full: whoever gives a CA wants the
    server checked against it, not TLS that silently accepts any certificate.
    """
    if ca_path is None:
        return {}
    try:
        given = conninfo.conninfo_to_dict(dsn).get("sslmode")
    except psycopg.Error:
        given = None
    return {"sslrootcert": ca_path, **({} if given else {"sslmode": "verify-full"})}


def redact(text: str, dsn: str) -> str:
    """Remove the DSN and its password from ``text``."""
    secrets = [dsn]
    try:
        password = conninfo.conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        password = None
    if password:
        secrets.append(str(password))
    for s in sorted(secrets, key=len, reverse=True):
        if s:
            text = text.replace(s, "***")
    return text


def classify(error: BaseException, dsn: str) -> ProbeError:
    """Map a psycopg error to the probe's vocabulary, with a message safe to show."""
    if isinstance(error, ProbeError):
        return error
    text = redact(str(error).strip(), dsn)
    if isinstance(error, psycopg.ProgrammingError) and not isinstance(
        error, psycopg.errors.InsufficientPrivilege
    ):
        # libpq's parser may echo parts of a malformed DSN: say nothing of its content.
        return ProbeError(
            ProbeFailure.DSN_INVALID, "the DSN is not a valid libpq connection string or URI"
        )
    if isinstance(error, psycopg.errors.InsufficientPrivilege):
        return ProbeError(
            ProbeFailure.PERMISSION_DENIED,
            f"{text} (grant pg_monitor and pg_signal_backend to the monitoring role)",
        )
    lowered = text.lower()
    if (
        "password authentication failed" in lowered
        # PgBouncer's answer to a wrong SCRAM password.
        or "sasl authentication failed" in lowered
        or "no pg_hba.conf entry" in lowered
        or ("role" in lowered and "does not exist" in lowered)
    ):
        return ProbeError(ProbeFailure.AUTHENTICATION_FAILED, text)
    if isinstance(error, psycopg.OperationalError | OSError | asyncio.TimeoutError):
        return ProbeError(ProbeFailure.DATABASE_UNREACHABLE, text or type(error).__name__)
    return ProbeError(ProbeFailure.PROBE_FAILED, text or type(error).__name__)


def validate_dsn(dsn: str) -> None:
    """Raise ``ProbeError(DSN_INVALID)`` if ``dsn`` is not a libpq connection string or URI."""
    try:
        conninfo.conninfo_to_dict(dsn)
    except psycopg.Error as e:
        raise classify(e, dsn) from None


_UNDECODED = re.compile("[\udc80-\udcff]")


class LenientJsonLoader(Loader):
    """JSON whose text may hold bytes that are not UTF-8, kept as ``\\xNN`` escapes.

    Role and database names are shared by the whole cluster, and one created from a ``SQL_ASCII``
    database may hold any bytes; psycopg's own loader would raise ``UnicodeDecodeError`` on the
    first such name in ``pg_stat_activity``, and the operator would be blind to every backend.
    """

    def load(self, data: Buffer) -> object:
        text = bytes(data).decode("utf-8", errors="surrogateescape")
        # Each undecodable byte became a lone surrogate; inside a JSON string, write it as the
        # escaped backslash and hex digits, so it decodes to the 4 characters ``\xNN``.
        return json.loads(_UNDECODED.sub(lambda m: f"\\\\x{ord(m[0]) - 0xDC00:02x}", text))


class LenientTextLoader(Loader):
    """Text that may hold bytes that are not UTF-8, kept as ``\\xNN`` escapes.

    Role and database names are shared by the whole cluster, and one created from a ``SQL_ASCII``
    database may hold any bytes; psycopg's own loader would raise ``UnicodeDecodeError`` on the
    first such name in ``pg_stat_activity``, and the operator would be blind to every backend.
    """

    def load(self, data: Buffer) -> str:
        return bytes(data).decode("utf-8", errors="backslashreplace")


def _statement(raw: Sequence[Any]) -> LastStatement:
    pid, start, query_id, query = raw
    qid = int(query_id) if query_id not in (None, "", "0") else None
    return LastStatement(
        pid=int(pid), backend_start=float(start), query_id=qid, query=str(query or "")
    )


class Monitor:
    """The monitoring connection to one database; reconnects with backoff after a failure."""

    def __init__(
        self, dsn: str, ca_pem: str | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._dsn = dsn
        self._ca_pem = ca_pem
        self.key = dsn_key(dsn, ca_pem)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        self._retry_at = 0.0
        self._backoff = BACKOFF_FIRST_SECONDS
        self._last_error: ProbeError | None = None
        self._clock = clock
        # The next sample, shared by every budget that asks while another query runs.
        self._next: asyncio.Future[ServerSample] | None = None
        # The query running now and the last sample, each with when its query began (``clock``):
        # a budget due at a slot takes either if it began at the slot or after.
        self._running: tuple[float, asyncio.Future[ServerSample]] | None = None
        self._latest: tuple[float, ServerSample] | None = None
        self._sampling: set[asyncio.Task[None]] = set()
        # The last sample and its backends (groups, times), for the next query to ask only what
        # changed (forgotten with the connection: a new one may reach another server, a promoted
        # replica).
        self._detailed: ServerSample | None = None
        self._held: backends.Held | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed and not self._conn.broken

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        if time.monotonic() < self._retry_at and self._last_error is not None:
            # The same message as the failed attempt: a problem is announced once, not per poll.
            raise self._last_error
        validate_dsn(self._dsn)
        try:
            with ca_file(self._ca_pem) as ca_path:
                self._conn = await psycopg.AsyncConnection.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=CONNECT_TIMEOUT_SECONDS,
                    application_name=PROBE_APPLICATION_NAME,
                    options=PROBE_OPTIONS,
                    **tls_options(self._dsn, ca_path),
                )
        except (psycopg.Error, OSError) as e:
            self._fail(classify(e, self._dsn))
            raise self._last_error from None  # type: ignore[misc]
        self._conn.adapters.register_loader("json", LenientJsonLoader)
        for text_type in ("text", "name", "varchar"):
            self._conn.adapters.register_loader(text_type, LenientTextLoader)
        try:
            await answer_within(_query(self._conn, queries.WARM_UP, None), ANSWER_TIMEOUT_SECONDS)
        except (psycopg.Error, OSError, TimeoutError) as e:
            await self._conn.close()
            self._conn = None
            self._fail(classify(e, self._dsn))
            raise self._last_error from None  # type: ignore[misc]
        self._detailed, self._held = None, None
        self._backoff = BACKOFF_FIRST_SECONDS
        self._last_error = None
        return self._conn

    def _fail(self, err: ProbeError) -> None:
        self._last_error = ProbeError(err.failure, f"{err} (retrying with backoff)")
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_SECONDS)

    async def _run(
        self, query: LiteralString, params: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        async with self._lock:
            return await self._run_locked(query, params)

    async def _run_locked(
        self, query: LiteralString, params: dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        conn = await self._connection()
        try:
            return await answer_within(_query(conn, query, params), ANSWER_TIMEOUT_SECONDS)
        except TimeoutError as e:
            # The connection is being closed in the background; the next poll opens another.
            self._conn = None
            self._fail(classify(e, self._dsn))
            raise self._last_error from None  # type: ignore[misc]
        except (psycopg.Error, OSError) as e:
            err = classify(e, self._dsn)
            if conn.broken or conn.closed or isinstance(e, psycopg.OperationalError):
                await conn.close()
                self._conn = None
                self._fail(err)
                raise self._last_error from None  # type: ignore[misc]
            raise err from None

    async def sample(self, *, not_before: float | None = None) -> ServerSample:
        """Sample the server's client backends: one query, shared by every budget that asks.

        ``not_before`` is the earliest time (epoch seconds, this process's clock) the sample's
        query may have begun: budgets due at one slot of the poll grid pass that slot, and the
        first to ask starts the query the others take (or they take the last sample, if its
        query began at the slot or later). Without it, a caller gets a sample whose query began
        after it asked, never an older one. Either way the result is decoded once, for all.
        """
        if not_before is not None:
            if self._latest is not None and self._latest[0] >= not_before:
                return self._latest[1]
            if self._running is not None and self._running[0] >= not_before:
                return await asyncio.shield(self._running[1])
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._sample_for(self._next))
            self._sampling.add(task)
            task.add_done_callback(self._sampling.discard)
        return await asyncio.shield(self._next)

    async def _sample_for(self, shared: asyncio.Future[ServerSample]) -> None:
        async with self._lock:  # the query before this one has ended
            self._next = None  # who asks from now on waits for the next query
            began = self._clock()
            self._running = (began, shared)
            try:
                result = await self._sample_locked()
            except Exception as e:  # every waiter sees the probe's error
                shared.set_exception(e)
                shared.exception()  # retrieved: an error no waiter is left for is no problem
            except BaseException:
                shared.cancel()
                raise
            else:
                self._latest = (began, result)
                shared.set_result(result)
            finally:
                self._running = None

    async def _sample_locked(self) -> ServerSample:
        """One sample: per-backend detail only for what changed since the last one (see
        ``probe.backends``); every detail again when the last one is not what the server says."""
        since = backends.detail_since(self._detailed)
        (row,) = await self._run_locked(queries.BACKEND_SAMPLE, {"since": since})
        decoded = backends.decode(row, self._held)
        if decoded is None:
            (row,) = await self._run_locked(queries.BACKEND_SAMPLE, {"since": None})
            decoded = backends.decode(row, None)
            if decoded is None:  # every backend had its detail: cannot happen
                raise ProbeError(ProbeFailure.PROBE_FAILED, "a backend came without its detail")
        self._detailed, self._held = decoded.sample, decoded.held
        return decoded.sample

    async def terminate(self, backends: Iterable[IdleBackend]) -> Termination:
        """Terminate each given backend that is still the same, still idle and not used since the
        probe (``queries.TERMINATE_IDLE``); backends the monitoring role may not signal are left
        alone and named in ``not_permitted``."""
        chosen = list(backends)
        if not chosen:
            return Termination()
        rows = await self._run(
            queries.TERMINATE_IDLE,
            {
                "pids": [b.pid for b in chosen],
                "starts": [b.backend_start for b in chosen],
                "changes": [b.state_change for b in chosen],
            },
        )
        return Termination(
            terminated=tuple(int(pid) for pid, permitted, ok in rows if permitted and ok),
            not_permitted=tuple(int(pid) for pid, permitted, _ in rows if not permitted),
        )

    async def statements(self, backends: Iterable[tuple[int, float]]) -> list[LastStatement]:
        """The last statement of each ``(pid, backend_start)`` still open (others are left out)."""
        chosen = list(backends)
        if not chosen:
            return []
        ((rows,),) = await self._run(
            queries.STATEMENTS,
            {"pids": [pid for pid, _ in chosen], "starts": [start for _, start in chosen]},
        )
        return [_statement(r) for r in rows]

    async def close(self) -> None:
        async with self._lock:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None


class MonitorPool:
    """One ``Monitor`` per distinct DSN, shared by every budget that names that DSN.

    Budgets bind to a DSN; when no budget is bound to a DSN any more (a budget was deleted, or its
    Secret now holds another DSN), its connection is closed.
    """

    def __init__(self) -> None:
        self._monitors: dict[str, Monitor] = {}
        self._bound: dict[str, str] = {}  # budget id -> DSN key

    async def bind(self, budget: str, dsn: str, ca_pem: str | None = None) -> Monitor:
        key = dsn_key(dsn, ca_pem)
        previous = self._bound.get(budget)
        self._bound[budget] = key
        if previous is not None and previous != key:
            await self._drop_if_unused(previous)
        if key not in self._monitors:
            self._monitors[key] = Monitor(dsn, ca_pem)
        return self._monitors[key]

    async def unbind(self, budget: str) -> None:
        key = self._bound.pop(budget, None)
        if key is not None:
            await self._drop_if_unused(key)

    async def _drop_if_unused(self, key: str) -> None:
        if key not in self._bound.values() and key in self._monitors:
            await self._monitors.pop(key).close()

    @property
    def open_connections(self) -> int:
        return sum(1 for m in self._monitors.values() if m.connected)

    async def close(self) -> None:
        for monitor in list(self._monitors.values()):
            await monitor.close()
        self._monitors.clear()
        self._bound.clear()
