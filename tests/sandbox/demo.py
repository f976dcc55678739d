"""The local demo: a connection leak, and connbudget keeping PostgreSQL inside its budget.

It brings up the sandbox, installs the CRD, starts the operator, deploys a leaky app (3 replicas,
like a Django app under ASGI that never closes its connections), a well-behaved app and a
ConnectionBudget, and shows live usage against the budget, the operator's decisions and actions,
until a whole episode has played (leak, warning, breach, remediation, recovery). Then it prints a
summary, writes a timeline chart and tears everything down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import psycopg
import yaml

from sandbox.core import Sandbox
from sandbox.fixtures import STEADY_IMAGE, Workloads

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "demo"
LIMIT_SECONDS = 240.0  # the demo stops by itself after this, episode or not
AFTER_RECOVERY_SECONDS = 5.0
BUDGET = 60
SPEC: dict[str, Any] = {
    "database": {"secretRef": {"name": "pg-monitor"}},
    "budget": {"maxConnections": BUDGET, "warningPercent": 80},
    "selector": {"matchLabels": {"app": "web"}},
    "pollSeconds": 2,
    "leakDetection": {"idleSeconds": 120},
    "remediation": {
        "breachSeconds": 6,
        "cooldownSeconds": 30,
        "steps": ["TerminateIdle", "RestartPods"],
        "terminateIdle": {"minIdleSeconds": 10},
        "restartPods": {"minPodAgeSeconds": 20},
    },
}
ACTIONS = {
    "IdleConnectionsTerminated",
    "PodEvicted",
    "WorkloadRestarted",
    "PoolerScaled",
    "PodDeleted",
    "RestartBlocked",
    "DryRun",
}


def say(message: str) -> None:
    print(message, flush=True)


def is_refusal(error: psycopg.OperationalError) -> bool:
    """Tell whether PostgreSQL refused a connection because it is full."""
    text = str(error)
    return "too many clients" in text or "remaining connection slots are reserved" in text


@dataclass
class Timeline:
    t0: float
    samples: list[tuple[float, int, int, str]] = field(default_factory=list)  # t, server, counted
    events: list[tuple[float, str, str]] = field(default_factory=list)
    refused: int = 0
    attempts: int = 0

    def first(self, reason: str) -> float | None:
        return next((t for t, r, _ in self.events if r == reason), None)


@contextlib.contextmanager
def operator(sb: Sandbox, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "KUBECONFIG": sb.kubeconfig}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "connbudget",
                "run",
                "--namespace",
                NAMESPACE,
                "--standalone",
                "--metrics-port",
                "0",
                "--liveness",
                "",
                "--log-format",
                "json",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def setup(sb: Sandbox, api: kubernetes.client.ApiClient) -> Workloads:
    core = kubernetes.client.CoreV1Api(api)
    ext = kubernetes.client.ApiextensionsV1Api(api)
    crd = yaml.safe_load((ROOT / "crds" / "connectionbudgets.connbudget.io.yaml").read_text())
    ext.create_custom_resource_definition(crd)
    core.create_namespace({"metadata": {"name": NAMESPACE}})
    for _ in range(100):
        with contextlib.suppress(kubernetes.client.rest.ApiException):
            core.read_namespaced_service_account("default", NAMESPACE)
            break
        time.sleep(0.1)
    core.create_namespaced_secret(
        NAMESPACE, {"metadata": {"name": "pg-monitor"}, "stringData": {"dsn": sb.db.monitor_dsn}}
    )
    return Workloads(sandbox=sb, api=api)


def chart(
    tl: Timeline,
    usable: int,
    path: Path,
    *,
    budget: int = BUDGET,
    title: str = "connbudget demo: a leaking Deployment kept inside its connection budget",
    refusals: Sequence[float] = (),
) -> None:
    """Draw connections over time, the budget and server lines, and the actions as markers.

    ``refusals`` (times) are drawn as marks along the top: connections the server refused.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    ts = [t - tl.t0 for t, *_ in tl.samples]
    ax.plot(
        ts,
        [s for _, s, _, _ in tl.samples],
        label="client connections on the server",
        color="#1f77b4",
        linewidth=2,
    )
    ax.plot(
        ts,
        [c for _, _, c, _ in tl.samples],
        label="counted against the budget",
        color="#ff7f0e",
        linewidth=1.5,
        linestyle="--",
    )
    ax.axhline(budget, color="#d62728", label=f"budget ({budget})")
    ax.axhline(budget * 0.8, color="#e6a700", linestyle=":", label="warning line (80%)")
    ax.axhline(usable, color="black", linestyle="-.", label=f"server full ({usable} usable)")
    colors = {
        "IdleConnectionsTerminated": "#2ca02c",
        "PodEvicted": "#9467bd",
        "RestartBlocked": "#8c564b",
    }
    # Different dashes and widths, so markers at the same moment both stay visible.
    styles: dict[str, tuple[Any, float]] = {
        "IdleConnectionsTerminated": ("-", 1.5),
        "PodEvicted": ((0, (3, 3)), 3.0),
        "RestartBlocked": (":", 2.0),
    }
    seen: set[str] = set()
    for t, reason, _ in tl.events:
        if reason in ACTIONS:
            style, width = styles.get(reason, ("-", 1.0))
            ax.axvline(
                t - tl.t0,
                color=colors.get(reason, "grey"),
                alpha=0.8,
                linestyle=style,
                linewidth=width,
                label=reason if reason not in seen else None,
            )
            seen.add(reason)
    if refusals:
        ax.plot(
            [t - tl.t0 for t in refusals],
            [usable + 5] * len(refusals),
            linestyle="none",
            marker="|",
            markersize=9,
            color="#d62728",
            label=f"refused connection ({len(refusals)})",
        )
    ax.set_xlabel("seconds since the leak began")
    ax.set_ylabel("connections")
    ax.set_title(title)
    ax.set_ylim(0, usable + 10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def play(sb: Sandbox, limit: float, out_dir: Path) -> Timeline:
    api = sb.api_client()
    wl = setup(sb, api)
    custom = kubernetes.client.CustomObjectsApi(api)
    core = kubernetes.client.CoreV1Api(api)
    db = sb.db
    with operator(sb, out_dir / "operator.log"):
        wl.deploy(
            NAMESPACE,
            "worker",
            image=STEADY_IMAGE,
            replicas=1,
            env={"POOL_SIZE": "3", "QUERY_INTERVAL": "1", "RECONNECT": "0"},
        )
        custom.create_namespaced_custom_object(
            "connbudget.io",
            "v1alpha1",
            NAMESPACE,
            "connectionbudgets",
            {
                "apiVersion": "connbudget.io/v1alpha1",
                "kind": "ConnectionBudget",
                "metadata": {"name": "web"},
                "spec": SPEC,
            },
        )
        wl.deploy(NAMESPACE, "web", replicas=3, env={"LEAK_RATE": "1.5", "LEAK_MAX": "100"})
        say(
            f"\ndeployed web (leaky: 3 pods, 1.5 connections/s each, never closed), worker (a "
            f"steady pool of 3) and ConnectionBudget web (budget {BUDGET}, poll 2 s, act after "
            f"6 s over budget)\n"
        )
        tl = Timeline(t0=time.time())
        monitor = psycopg.connect(db.monitor_dsn, autocommit=True, application_name="demo-watch")
        seen_events: set[str] = set()
        recovered_at: float | None = None
        while time.time() - tl.t0 < limit:
            server, counted = _count(monitor)
            body = custom.get_namespaced_custom_object(
                "connbudget.io", "v1alpha1", NAMESPACE, "connectionbudgets", "web"
            )
            st = body.get("status") or {}
            phase = st.get("phase", "Pending")
            tl.samples.append((time.time(), server, counted, phase))
            tl.attempts += 1
            try:
                psycopg.connect(
                    db.app_dsn, connect_timeout=3, application_name="demo-probe"
                ).close()
            except psycopg.OperationalError as e:
                if is_refusal(e):
                    tl.refused += 1
            to_full = (st.get("usage") or {}).get("secondsToFull")
            say(
                f"t={time.time() - tl.t0:5.1f}s  {counted:3d}/{BUDGET} counted  "
                f"{server:3d}/{db.max_connections} on the server  {phase:<12}"
                + (f"  full in {to_full:.0f}s" if isinstance(to_full, int | float) else "")
            )
            for ev in sorted(
                core.list_namespaced_event(NAMESPACE).items,
                key=lambda e: e.metadata.creation_timestamp,
            ):
                if ev.involved_object.kind != "ConnectionBudget" or ev.metadata.uid in seen_events:
                    continue
                seen_events.add(ev.metadata.uid)
                tl.events.append((time.time(), ev.reason, ev.message))
                say(f"    >> {ev.reason}: {ev.message}")
            if (
                recovered_at is None
                and tl.first("BudgetRecovered")
                and any(r in ACTIONS for _, r, _ in tl.events)
            ):
                recovered_at = time.time()
            if recovered_at and time.time() - recovered_at > AFTER_RECOVERY_SECONDS:
                break
            time.sleep(1)
        monitor.close()
    return tl


def _count(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE datname = 'app') FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND application_name NOT IN "
        "('demo-watch', 'connbudget-probe')"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def summarize(tl: Timeline, usable: int, png: Path) -> None:
    def at(reason: str) -> str:
        t = tl.first(reason)
        return f"{t - tl.t0:5.1f}s" if t else "   -  "

    peak = max((s for _, s, _, _ in tl.samples), default=0)
    actions: dict[str, int] = {}
    for _, r, _ in tl.events:
        if r in ACTIONS:
            actions[r] = actions.get(r, 0) + 1
    say("\nsummary")
    say(f"  warning        at {at('BudgetWarning')}")
    say(f"  over budget    at {at('BudgetExceeded')}")
    say(f"  first action   at {at('IdleConnectionsTerminated')}  (IdleConnectionsTerminated)")
    say(f"  recovered      at {at('BudgetRecovered')}")
    say(f"  actions        {json.dumps(actions)}")
    say(f"  peak           {peak} connections on the server ({usable} usable)")
    say(f"  refused        {tl.refused} of {tl.attempts} new connections tried once a second")
    done = all(tl.first(r) for r in ("BudgetWarning", "BudgetExceeded", "BudgetRecovered"))
    say(
        "  episode        "
        + (
            "complete: leak, warning, breach, remediation, recovery"
            if done
            else "incomplete (time limit reached)"
        )
    )
    say(f"  chart          {png}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=float, default=LIMIT_SECONDS, help="seconds at most")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="folder for the chart and the operator's log (default: a new one in $TMPDIR)",
    )
    args = parser.parse_args(argv)
    out_dir = args.output or Path(tempfile.mkdtemp(prefix="connbudget-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    sb = Sandbox.up(progress=lambda m: say(f"sandbox: {m}"))
    try:
        tl = play(sb, args.limit, out_dir)
        usable = sb.db.max_connections - 3
        png = out_dir / "timeline.png"
        chart(tl, usable, png)
        summarize(tl, usable, png)
        say(f"  operator log   {out_dir / 'operator.log'}")
    finally:
        sb.down()
        say("sandbox torn down")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
