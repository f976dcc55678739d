"""The PostgreSQL version matrix: one throwaway server per major, for the tests that ask for ``pg``.

Each major of ``sandbox.pgversions.MAJORS`` runs once per test session, started by the sandbox's
own ``postgres.start`` from that major's binaries: initdb in a temporary folder, loopback only, a
free port, the same roles (``connbudget_monitor`` with ``pg_monitor`` and ``pg_signal_backend``,
``app``) and a PgBouncer in front; stopped and removed afterwards. From PostgreSQL 16 on, two
``reserved_connections`` are set, so the probe's reserved slots are checked with and without them.

A major that is not installed fails its tests with the reason and the command that installs it
(``tests/sandbox/pgversions.py``): the matrix never skips.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from sandbox import pgversions, postgres
from sandbox.core import Sandbox
from sandbox.postgres import DatabaseInfo
from sandbox.procs import kill_tagged, stop_pid

MATRIX_MAX_CONNECTIONS = 20  # small: filling the server takes a fraction of a second
MATRIX_RESERVED_CONNECTIONS = 2  # reserved_connections, PostgreSQL 16 and later


@dataclass(frozen=True)
class Loopback:
    """The part of the sandbox's pod network the probe tests read: where clients come from."""

    host_ip: str = "127.0.0.1"


@dataclass(frozen=True)
class VersionServer:
    """A running PostgreSQL of one major, with PgBouncer in front (as the sandbox's ``db``)."""

    major: int
    version: str  # what its postgres --version says, e.g. "17.12 (Debian 17.12-0+deb13u1)"
    source: str
    db: DatabaseInfo
    network: Loopback = field(default_factory=Loopback)

    @property
    def reserved(self) -> int:
        """The slots ordinary roles cannot use: superuser's, and reserved_connections from 16."""
        return 3 + (MATRIX_RESERVED_CONNECTIONS if self.major >= 16 else 0)

    def as_sandbox(self) -> Sandbox:
        """This server where a sandbox test reads only ``.db`` and ``.network.host_ip``."""
        return cast(Sandbox, self)


@pytest.fixture(scope="session", params=pgversions.MAJORS, ids=lambda m: f"pg{m}")
def pg(request: pytest.FixtureRequest) -> Iterator[VersionServer]:
    """A throwaway PostgreSQL of each major in turn (the tests using it run once per major)."""
    major = int(request.param)
    found = pgversions.find(major)
    if found is None:
        pytest.fail(pgversions.why_missing(major), pytrace=False)
    state = Path(tempfile.mkdtemp(prefix=f"connbudget-pg{major}-"))
    state.chmod(0o711)  # the postgres user must traverse it to reach its own folder
    tag = str(state)
    settings = {"reserved_connections": str(MATRIX_RESERVED_CONNECTIONS)} if major >= 16 else {}
    pids: list[int] = []
    try:
        info, pids = postgres.start(
            state,
            tag=tag,
            host_ip="127.0.0.1",
            max_connections=MATRIX_MAX_CONNECTIONS,
            bin_dir=found.bin_dir,
            settings=settings,
        )
        yield VersionServer(major=major, version=found.version, source=found.source, db=info)
    finally:
        if pids:
            # SIGINT is PostgreSQL's fast shutdown: every client is disconnected.
            stop_pid(pids[0], grace=postgres.STOP_GRACE, sig=signal.SIGINT)
        kill_tagged(tag)  # PgBouncer, and anything left if the start failed half-way
        with contextlib.suppress(OSError):
            shutil.rmtree(state)
