"""The local demo: a real connection leak, and connbudget keeping PostgreSQL inside its budget.

It brings up the sandbox, installs the CRD, starts the operator, deploys a healthy Django 5.0.2
app (gunicorn, persistent connections reused every 5-20 s, no health checks), a ConnectionBudget
that names only its database, its budget and its selector, and then the leak: Django 5.0.1 under
uvicorn, whose connections stay open when a client hangs up mid-request (ticket #35059), driven
at ``LEAK_RATE`` per second. It shows live usage against the budget and what the operator says
and does until the leak has been held for a while and has stopped, then prints a summary (with
the damage counted from the apps' own logs), writes a timeline chart and tears everything down.
"""

from __future__ import annotations

import argparse
import contextlib
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

from sandbox.apps.deploy import deploy_app, leak_settings, pool_settings
from sandbox.core import Sandbox
from sandbox.fixtures import Workloads
from sandbox.workloads.outcomes import FAILURES, count_outcomes

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "demo"
LIMIT_SECONDS = 240.0  # the demo stops by itself after this, episode or not
LEAK_RATE = 5.0  # connections leaked per second
LEAK_SECONDS = 60.0  # how long the leak is driven
AFTER_LEAK_SECONDS = 15.0  # watched after the leak stops
BUDGET = 60
# Only the three fields a user must give: every other one is the CRD's default.
SPEC: dict[str, Any] = {
    "database": {"secretRef": {"name": "pg-monitor"}},
    "budget": {"maxConnections": BUDGET},
    "selector": {"matchLabels": {"tier": "shop"}},
}
ACTIONS = {
    "LeakDetected",
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


def play(sb: Sandbox, limit: float, out_dir: Path) -> tuple[Timeline, dict[str, dict[str, int]]]:
    api = sb.api_client()
    wl = setup(sb, api)
    custom = kubernetes.client.CustomObjectsApi(api)
    core = kubernetes.client.CoreV1Api(api)
    db = sb.db
    shop = {"tier": "shop"}
    with operator(sb, out_dir / "operator.log"):
        deploy_app(
            wl,
            NAMESPACE,
            "shop",
            kind="django",
            driver_env=pool_settings(4, (5.0, 20.0), limit, INFLIGHT_FRACTION="0.3"),
            labels=shop,
        )
        custom.create_namespaced_custom_object(
            "connbudget.io",
            "v1alpha1",
            NAMESPACE,
            "connectionbudgets",
            {
                "apiVersion": "connbudget.io/v1alpha1",
                "kind": "ConnectionBudget",
                "metadata": {"name": "shop"},
                "spec": SPEC,
            },
        )
        deploy_app(
            wl,
            NAMESPACE,
            "web",
            kind="leak",
            driver_env=leak_settings(LEAK_RATE, LEAK_SECONDS),
            labels=shop,
        )
        say(
            f"\ndeployed shop (Django 5.0.2 under gunicorn: 4 persistent connections, each reused "
            f"every 5-20 s, no health checks), web (Django 5.0.1 under uvicorn, leaking "
            f"{LEAK_RATE:g} connections/s for {LEAK_SECONDS:.0f} s: clients hang up mid-request) "
            f"and ConnectionBudget shop (budget {BUDGET}, nothing else set)\n"
        )
        tl = Timeline(t0=time.time())
        monitor = psycopg.connect(db.monitor_dsn, autocommit=True, application_name="demo-watch")
        seen_events: dict[str, int] = {}
        stop_at = tl.t0 + min(limit, LEAK_SECONDS + AFTER_LEAK_SECONDS)
        while time.time() < stop_at:
            server, counted = _count(monitor)
            body = custom.get_namespaced_custom_object(
                "connbudget.io", "v1alpha1", NAMESPACE, "connectionbudgets", "shop"
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
            leak: dict[str, Any] = next(
                (
                    o
                    for o in (st.get("usage") or {}).get("byOwner") or []
                    if o.get("owner") == "Deployment/web"
                ),
                {},
            )
            say(
                f"t={time.time() - tl.t0:5.1f}s  {counted:3d}/{BUDGET} counted  "
                f"{server:3d}/{db.max_connections} on the server  {phase:<12}"
                + (
                    f"  web: {leak['class']}, {leak.get('leakRatePerMinute', 0) / 60:.1f}/s"
                    if leak.get("class")
                    else ""
                )
            )
            for ev in sorted(
                core.list_namespaced_event(NAMESPACE).items,
                key=lambda e: e.metadata.creation_timestamp,
            ):
                count = ev.count or 1
                if (
                    ev.involved_object.kind != "ConnectionBudget"
                    or seen_events.get(ev.metadata.uid) == count
                ):
                    continue
                if ev.metadata.uid not in seen_events:
                    tl.events.append((time.time(), ev.reason, ev.message))
                seen_events[ev.metadata.uid] = count
                say(f"    >> {ev.reason} (x{count}): {ev.message}")
            time.sleep(1)
        monitor.close()
        damage = {app: _outcomes(sb, wl, app) for app in ("shop", "web")}
    return tl, damage


def _outcomes(sb: Sandbox, wl: Workloads, app: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for p in wl.pods(NAMESPACE, f"app={app}"):
        for k, v in count_outcomes(sb.pod_log(NAMESPACE, p.metadata.name, "app")).items():
            total[k] = total.get(k, 0) + v
    return total


def _count(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE datname = 'app') FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND application_name NOT IN "
        "('demo-watch', 'connbudget-probe')"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def summarize(tl: Timeline, usable: int, png: Path, damage: dict[str, dict[str, int]]) -> None:
    def at(reason: str) -> str:
        t = tl.first(reason)
        return f"{t - tl.t0:5.1f}s" if t else "   -  "

    peak = max((c for _, _, c, _ in tl.samples), default=0)
    peak_server = max((s for _, s, _, _ in tl.samples), default=0)
    healthy_failed = sum(damage["shop"].get(k, 0) for k in FAILURES)
    broken = sum(d.get("inflight_broken", 0) for d in damage.values())
    say("\nsummary")
    say(f"  leak detected  at {at('LeakDetected')}")
    say(f"  first action   at {at('IdleConnectionsTerminated')}  (IdleConnectionsTerminated)")
    say(f"  over budget    at {at('BudgetExceeded')}")
    say(f"  peak           {peak}/{BUDGET} counted, {peak_server} on the server ({usable} usable)")
    say(f"  refused        {tl.refused} of {tl.attempts} new connections tried once a second")
    say(
        f"  healthy app    {damage['shop'].get('ok', 0)} requests ok, {healthy_failed} failed "
        f"(from its own log)"
    )
    say(f"  in flight      {broken} requests broken between two queries")
    held = tl.first("LeakDetected") is not None and peak <= BUDGET
    say(
        "  episode        "
        + (
            "the leak was named and held inside the budget, the healthy app unharmed"
            if held and healthy_failed == 0 and broken == 0 and tl.refused == 0
            else "NOT held: see the timeline and the operator log"
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
        tl, damage = play(sb, args.limit, out_dir)
        usable = sb.db.max_connections - 3
        png = out_dir / "timeline.png"
        chart(
            tl,
            usable,
            png,
            title="connbudget demo: a real Django leak held inside its connection budget",
        )
        summarize(tl, usable, png, damage)
        say(f"  operator log   {out_dir / 'operator.log'}")
    finally:
        sb.down()
        say("sandbox torn down")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
