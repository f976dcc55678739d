"""The local demo: a real connection leak, and connbudget keeping PostgreSQL inside its budget.

It brings up the sandbox, installs the CRD, starts the operator, deploys a healthy Django 5.0.2
app (gunicorn, persistent connections reused every 5-20 s, no health checks), a ConnectionBudget
that names only its database, its budget and its selector, and then the leak: Django 5.0.1 under
uvicorn, whose connections stay open when a client hangs up mid-request (ticket #35059), driven
at ``LEAK_RATE`` per second. It shows live usage against the budget and what the operator says
and does until the leak has been held for a while and has stopped, then prints a summary (with
the damage counted from the apps' own logs), writes a timeline chart and tears everything down.

Unless ``--no-prometheus``, a real Prometheus (``sandbox.prometheus``: Debian's binary, on
loopback) scrapes the operator every second and evaluates the chart's alert rules meanwhile; its
address is printed at the start, and the summary says which alerts fired when, with a few
queries to try. ``--linger N`` keeps it (and the sandbox) up N seconds after the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
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
from sandbox.procs import free_port
from sandbox.prometheus import (
    Prometheus,
    Target,
    chart_rule_groups,
    load_dashboard,
    render_dashboard,
    with_for,
    write_rules,
)
from sandbox.prometheus import running as running_prometheus
from sandbox.workloads.outcomes import FAILURES, count_outcomes

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "demo"
LIMIT_SECONDS = 240.0  # the demo stops by itself after this, episode or not
LEAK_RATE = 5.0  # connections leaked per second
LEAK_SECONDS = 60.0  # how long the leak is driven
AFTER_LEAK_SECONDS = 15.0  # watched after the leak stops
# The chart's leak alert waits 2 minutes before it fires, longer than the demo's leak: here 10 s.
DEMO_LEAK_FOR = "10s"
LEAK_ALERT = "ConnectionBudgetLeakDetected"
LINGER_MAX = 3600.0  # seconds --linger may keep everything up
DEMO_RATE_INTERVAL = "10s"  # Grafana's $__rate_interval for a 1 s scrape, a few polls wide
DASHBOARD_LEAD_SECONDS = 10.0  # drawn from this long before the leak began
STILL_FIRING_SECONDS = 3.0  # an alert seen firing this recently is still firing (1 s evaluations)
# Queries worth trying in the demo's Prometheus, with what they show.
QUERIES = (
    ("connbudget_leak_rate_connections_per_second", "leak rate per workload"),
    ("sum by (budget) (connbudget_connections)", "connections counted per budget"),
    ("connbudget_usage_ratio", "usage over budget"),
    ("increase(connbudget_terminated_connections_total[1m])", "backends terminated"),
    ('ALERTS{alertstate="firing"}', "alerts firing"),
)
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
def operator(sb: Sandbox, log: Path, metrics_port: int) -> Iterator[subprocess.Popen[bytes]]:
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
                str(metrics_port),
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


@contextlib.contextmanager
def prometheus(sb: Sandbox, metrics_port: int, out_dir: Path) -> Iterator[Prometheus]:
    """Prometheus scraping the demo's operator every second, with the chart's alert rules (the
    leak alert's ``for:`` shortened to ``DEMO_LEAK_FOR``)."""
    groups = with_for(chart_rule_groups(sb.bin_dir / "helm"), LEAK_ALERT, DEMO_LEAK_FOR)
    rules = write_rules(out_dir / "rules.yaml", groups)
    target = Target(address=f"127.0.0.1:{metrics_port}")
    with running_prometheus(
        out_dir / "prometheus", [target], tag=sb.tag, rule_files=[rules]
    ) as prom:
        say(
            f"prometheus: {prom.url} scrapes the operator every second, with the chart's alert "
            f"rules ({LEAK_ALERT} after {DEMO_LEAK_FOR} instead of 2 min); alerts at "
            f"{prom.url}/alerts"
        )
        yield prom


def fired_alerts(prom: Prometheus, t0: float) -> list[tuple[str, str, float, float]]:
    """The alerts that fired since ``t0``: name, what it names, first and last second seen."""
    found = []
    for s in prom.query_range('ALERTS{alertstate="firing"}', t0, time.time(), step=1):
        labels = s["metric"]
        subject = labels.get("owner") or f"{labels.get('namespace')}/{labels.get('budget')}"
        times = [float(t) - t0 for t, _ in s["values"]]
        found.append((labels["alertname"], subject, min(times), max(times)))
    return sorted(found, key=lambda f: f[2])


def show_prometheus(prom: Prometheus, tl: Timeline, out_dir: Path, linger: float) -> None:
    """Say which alerts fired and where to look, draw the dashboard's panels from Prometheus'
    data; keep Prometheus up ``linger`` seconds."""
    fired = fired_alerts(prom, tl.t0)
    now = time.time() - tl.t0
    png = render_dashboard(
        prom,
        load_dashboard(),
        {"namespace": NAMESPACE, "budget": ".*", "__rate_interval": DEMO_RATE_INTERVAL},
        tl.t0 - DASHBOARD_LEAD_SECONDS,
        time.time(),
        out_dir / "dashboard.png",
        title="connbudget dashboard: the demo's leak, from Prometheus",
    )
    say(f"  dashboard      {png}  (the Grafana dashboard's panels, drawn from this Prometheus)")
    until = "--linger N keeps it up N s more" if linger <= 0 else f"up {linger:.0f} s more"
    say(f"  prometheus     {prom.url}  (alerts: {prom.url}/alerts; {until})")
    for name, subject, first, last in fired:
        # The last evaluation, a second or two ago, still found it firing.
        still = last >= now - STILL_FIRING_SECONDS
        span = f"since {first:5.1f}s, still firing" if still else f"{first:5.1f}s to {last:5.1f}s"
        say(f"  alert          {name} ({subject}): {span}")
    if not fired:
        say("  alert          none fired")
    for expr, what in QUERIES:
        graph = urllib.parse.urlencode({"g0.expr": expr, "g0.range_input": "5m", "g0.tab": "0"})
        say(f"  query          {what}: {expr}")
        say(f"                 {prom.url}/graph?{graph}")
    if linger > 0:
        say(f"\nPrometheus and the sandbox stay up for {linger:.0f} s (Ctrl-C ends it sooner)")
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(min(linger, LINGER_MAX))


def play(
    sb: Sandbox, limit: float, out_dir: Path, metrics_port: int
) -> tuple[Timeline, dict[str, dict[str, int]]]:
    api = sb.api_client()
    wl = setup(sb, api)
    custom = kubernetes.client.CustomObjectsApi(api)
    core = kubernetes.client.CoreV1Api(api)
    db = sb.db
    shop = {"tier": "shop"}
    with operator(sb, out_dir / "operator.log", metrics_port):
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
    parser.add_argument(
        "--no-prometheus",
        action="store_true",
        help="do not run Prometheus (Debian's binary) against the operator",
    )
    parser.add_argument(
        "--linger",
        type=float,
        default=0.0,
        help=f"seconds to keep Prometheus and the sandbox up after the summary (at most "
        f"{LINGER_MAX:.0f})",
    )
    args = parser.parse_args(argv)
    out_dir = args.output or Path(tempfile.mkdtemp(prefix="connbudget-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    sb = Sandbox.up(progress=lambda m: say(f"sandbox: {m}"))
    try:
        with contextlib.ExitStack() as stack:
            metrics_port = free_port()
            prom = (
                None
                if args.no_prometheus
                else stack.enter_context(prometheus(sb, metrics_port, out_dir))
            )
            tl, damage = play(sb, args.limit, out_dir, metrics_port)
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
            if prom is not None:
                show_prometheus(prom, tl, out_dir, args.linger)
    finally:
        sb.down()
        say("sandbox torn down")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
