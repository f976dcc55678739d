"""A malformed PgBouncer admin DSN never shows any fragment of itself (no server needed).

libpq's parser quotes parts of a DSN it cannot parse (``missing "=" after "..."``), and a password
with a space in an unquoted DSN is exactly such a part. The probe must turn that into its redacted
``ProbeError``; the cycle must report it as a condition, and nothing may reach a log, an Event,
status or the terminal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Sequence

import pytest

from connbudget.model.observations import PoolerSample
from connbudget.model.spec import SecretRef
from connbudget.probe.errors import ProbeError, ProbeFailure
from connbudget.probe.pgbouncer import dsn_for_host, host_of, sample_poolers
from unit.test_cycle import OVER_STATUS, WEB1, WEB2, FakeKube, FakeMonitor, leaking, make_deps
from unit.test_cycle import run_cycle as run_one_cycle
from unit.test_cycle_faults import POOLER_SPEC

# A password with a space, and a query parameter without "=": libpq quotes both in its errors.
FRAGMENTS = ("Planted", "Frag-9xQ")
MALFORMED = (
    "host=127.0.0.1 port=6432 user=pgbouncer_admin password=Planted Frag-9xQ dbname=pgbouncer",
    "postgresql://pgbouncer_admin:Planted@127.0.0.1:6432/pgbouncer?Frag-9xQ",
)


def leaked(text: str) -> list[str]:
    return [f for f in FRAGMENTS if f in text]


@pytest.mark.parametrize("dsn", MALFORMED, ids=["keyword-value", "uri"])
def test_a_malformed_admin_dsn_is_a_redacted_probe_error(dsn: str) -> None:
    with pytest.raises(ProbeError) as err:
        asyncio.run(sample_poolers(dsn, ["198.18.0.9", "198.18.0.10"], replicas=2))
    assert err.value.failure is ProbeFailure.DSN_INVALID
    assert not leaked(str(err.value))
    # Nothing chained either: a traceback would print the raw error as its cause or context.
    assert err.value.__cause__ is None
    assert err.value.__suppress_context__
    with pytest.raises(ProbeError) as err:
        host_of(dsn)
    assert not leaked(str(err.value))
    with pytest.raises(ProbeError) as err:
        dsn_for_host(dsn, "198.18.0.9")
    assert not leaked(str(err.value))


class AdminSecretKube(FakeKube):
    """The database Secret is fine; the pooler's admin Secret holds a malformed DSN."""

    def __init__(self, admin_dsn: str) -> None:
        super().__init__()
        self.admin_dsn = admin_dsn

    async def read_secret_value(self, namespace: str, ref: SecretRef) -> str:
        if ref.name == "pgbouncer-admin":
            return self.admin_dsn
        return await super().read_secret_value(namespace, ref)


@pytest.mark.parametrize("dsn", MALFORMED, ids=["keyword-value", "uri"])
def test_a_cycle_with_a_malformed_admin_dsn_reports_it_and_logs_no_fragment(
    dsn: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    kube, monitor = AdminSecretKube(dsn), FakeMonitor(leaking())
    deps, events = make_deps(kube, monitor, [WEB1, WEB2])

    async def real(template: str, hosts: Sequence[str], replicas: int) -> PoolerSample:
        return await sample_poolers(template, ["198.18.0.9", *hosts], replicas=replicas)

    deps = dataclasses.replace(deps, sample_poolers=real)
    caplog.set_level(logging.DEBUG)
    try:
        out = run_one_cycle(deps, spec=POOLER_SPEC, old_status=OVER_STATUS)
    except Exception as e:  # what the reconciler would have logged with log.exception
        logging.getLogger("connbudget.test").exception("reconcile failed")
        pytest.fail(f"the cycle raised {type(e).__name__}; it logs {leaked(caplog.text)}")
    ready = next(c for c in out["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "DsnInvalid")
    assert "not a valid libpq connection string" in ready["message"]
    # The pooler's part waits (its clients are hidden); a direct leak is still held.
    assert not [c for c in kube.calls if c[0] == "scale"]
    assert monitor.terminated
    captured = capsys.readouterr()
    outputs = {
        "status": json.dumps(out),
        "events": json.dumps(events),
        "logs": caplog.text,
        "stdout": captured.out,
        "stderr": captured.err,
    }
    assert {k: leaked(v) for k, v in outputs.items() if leaked(v)} == {}
