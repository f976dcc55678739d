"""Benchmark 4 (footprint and scale) and the load and soak test of issue 7.

A fleet of pods without processes (the sandbox's kubelet gives them an address and reports them
Running) in ``NAMESPACES`` namespaces, and ConnectionBudgets over them, each selecting one pod and
naming one of ``DATABASES`` databases of one server (so the operator needs one monitoring
connection per database, however many budgets). Budgets keep the spec's default poll.

- Footprint: for 1, 100 and 500 budgets, a fresh operator; once every budget has been probed and
  a settling time has passed, its resident memory and CPU over a window, whether every budget
  kept its cadence, and the database connections it holds.
- Import memory: a fresh interpreter's resident memory once it has imported the operator, or
  one of its main dependencies, or nothing: the fixed cost every operator process starts with.
- Load and soak: 200 budgets, 500 pods, 1,000 client backends (two per pod, named after it, each
  running a query about once a minute), for ``minutes`` minutes: resident memory and CPU every
  10 s, every budget's probes each minute, and every warning or error the operator logged or
  counted.

Cadence: a budget polled every P seconds, by a worker that wakes every second, probes at least
``floor(W / (P + 1))`` times in a window of W seconds; fewer means it missed a poll.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.common import (
    Kube,
    Operator,
    Server,
    Spread,
    Ticker,
    cpu_seconds,
    metric_samples,
    parse_time,
    probe_counts,
    rss_mb,
    say,
)
from connbudget.model.observations import PROBE_APPLICATION_NAME
from connbudget.model.spec import parse_spec
from sandbox.core import Sandbox
from sandbox.fixtures import LEAKY_IMAGE

NAMESPACES = 10
PODS = 500
DATABASES = ("app", "db1", "db2", "db3", "db4")
# The spec's default poll, as the operator parses a budget that names none.
POLL = parse_spec(
    {
        "database": {"secretRef": {"name": "pg"}},
        "budget": {"maxConnections": 1},
        "selector": {"matchLabels": {"app": "x"}},
    }
).poll_seconds
TICK = 1.0  # the operator's worker tick (connbudget.config.TICK_SECONDS)
SETTLE_SECONDS = 10.0
LOAD_BUDGETS = 200
LOAD_BACKENDS = 1000
SOAK_SAMPLE_SECONDS = 10.0
BASELINE_SECONDS = 120.0  # one budget over the soak's backends: the CPU the soak compares with
FLAT_MB = 10.0  # memory counts as flat if it grows less than this over the soak
# Issue 7's footprint targets, met or missed at TARGET_BUDGETS budgets.
TARGET_BUDGETS = 500
RSS_TARGET_MB = 150.0  # resident memory, MB
CPU_TARGET_PERCENT = 5.0  # CPU, % of one core
# Issue 14's: CPU grows with databases, not budgets; memory per budget small.
RATIO_BUDGETS = 500  # budgets over every database ...
CPU_RATIO_TARGET = 10.0  # ... use at most this many times the CPU of one budget
MEMORY_BUDGETS = 1000  # budgets on one replica ...
MEMORY_TARGET_MB = 150.0  # ... within this resident memory
PER_BUDGET_KB_TARGET = 25.0  # ... and at most this much per budget above one budget
# What each fresh interpreter imports before it reads its resident memory. "operator" is what
# `connbudget run` imports before kopf starts: connbudget.cli alone imports neither kopf nor the
# Kubernetes client, since it imports the handlers only when it runs them.
IMPORTS: dict[str, tuple[str, ...]] = {
    "interpreter": (),
    "operator": ("connbudget.cli", "connbudget.handlers"),
    "kopf": ("kopf",),
    "kubernetes": ("kubernetes",),
    "psycopg": ("psycopg",),
    "prometheus_client": ("prometheus_client",),
}
IMPORT_REPEATS = 3  # fresh interpreters per entry; the median is kept
IMPORT_TIMEOUT_SECONDS = 60.0  # one interpreter's imports; a few seconds on a loaded machine
# Run in each fresh interpreter after its imports: print its own VmRSS (kB).
_PRINT_VMRSS = (
    "print(next(line.split()[1] for line in open('/proc/self/status') "
    "if line.startswith('VmRSS:')))"
)


def footprint_setup(*, namespaces: int = NAMESPACES, pods: int = PODS) -> dict[str, Any]:
    """The fleet, poll and targets of the footprint benchmark, as results.json records them."""
    return {
        "namespaces": namespaces,
        "pods": pods,
        "databases": len(DATABASES),
        "poll_seconds": POLL,
        "settle_seconds": SETTLE_SECONDS,
        "target_budgets": TARGET_BUDGETS,
        "rss_target_mb": RSS_TARGET_MB,
        "cpu_target_percent": CPU_TARGET_PERCENT,
        "ratio_budgets": RATIO_BUDGETS,
        "cpu_ratio_target": CPU_RATIO_TARGET,
        "memory_budgets": MEMORY_BUDGETS,
        "memory_target_mb": MEMORY_TARGET_MB,
        "per_budget_kb_target": PER_BUDGET_KB_TARGET,
    }


def import_rss_mb(
    imports: Mapping[str, Sequence[str]] = IMPORTS, repeats: int = IMPORT_REPEATS
) -> dict[str, float]:
    """Measure the resident memory (MB) of a fresh interpreter once it has imported each entry.

    Each entry runs ``repeats`` times, each in a new ``sys.executable -c`` process (the operator's
    interpreter and environment) that imports the entry's modules and then reads its own VmRSS;
    the median is kept. Every figure includes the bare interpreter's, and the entries overlap
    (kopf imports the Kubernetes client itself whenever it is installed).

    Args:
        imports: each entry's name and the modules it imports (none: the bare interpreter).
        repeats: fresh interpreters per entry.

    Returns:
        Each entry's median resident memory in MB, in the order of ``imports``.

    Raises:
        subprocess.CalledProcessError: an interpreter failed (a module is not installed).
    """
    out: dict[str, float] = {}
    for name, modules in imports.items():
        code = (f"import {', '.join(modules)}\n" if modules else "") + _PRINT_VMRSS
        kb = [
            int(
                subprocess.run(
                    [sys.executable, "-c", code],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=IMPORT_TIMEOUT_SECONDS,
                ).stdout
            )
            for _ in range(repeats)
        ]
        out[name] = statistics.median(kb) / 1024
    return out


def expected_probes(window: float, poll: int = POLL) -> int:
    """The fewest probes a budget that keeps its cadence makes in ``window`` seconds."""
    return math.floor(window / (poll + TICK))


@dataclass
class Fleet:
    """The namespaces, pods and budgets of the footprint and load benchmarks."""

    kube: Kube
    server: Server
    namespaces: int = NAMESPACES
    pods: int = PODS
    budgets: list[tuple[str, str]] = field(default_factory=list)  # (namespace, name)

    def ns(self, k: int) -> str:
        return f"fp-{k}"

    def pod_name(self, i: int) -> tuple[str, str]:
        """Namespace and name of pod ``i`` (pods are dealt round-robin over the namespaces)."""
        k, j = i % self.namespaces, i // self.namespaces
        return self.ns(k), f"p{k}-{j}"

    def database(self, k: int) -> str:
        return DATABASES[k % len(DATABASES)]

    def create(self) -> None:
        missing = [d for d in DATABASES if d != "app"]
        with self.server.superuser() as conn:
            have = {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}
        self.server.create_databases([d for d in missing if d not in have])
        for k in range(self.namespaces):
            self.kube.namespace(self.ns(k))
            for d in DATABASES:
                self.kube.secret(self.ns(k), f"pg-{d}", {"dsn": self.server.monitor_dsn(d)})

        def pod(i: int) -> None:
            ns, name = self.pod_name(i)
            self.kube.core.create_namespaced_pod(
                ns,
                {
                    "metadata": {
                        "name": name,
                        "labels": {"app": name, "bench": "fleet"},
                        "annotations": {"sandbox.connbudget.io/process": "false"},
                    },
                    "spec": {
                        "terminationGracePeriodSeconds": 0,
                        "containers": [{"name": "app", "image": LEAKY_IMAGE}],
                    },
                },
            )

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(pod, range(self.pods)))
        deadline = time.monotonic() + 180
        running = 0
        while time.monotonic() < deadline:
            items = self.kube.core.list_pod_for_all_namespaces(label_selector="bench=fleet").items
            running = sum(1 for p in items if p.status.phase == "Running" and p.status.pod_ip)
            if running >= self.pods:
                return
            time.sleep(1.0)
        raise RuntimeError(f"only {running} of {self.pods} pods Running after 180s")

    def scale_budgets(self, n: int) -> None:
        """Create or delete budgets until there are ``n``; budget i selects pod i (modulo the
        pods: past as many budgets as pods, a pod is selected by more than one)."""
        while len(self.budgets) > n:
            ns, name = self.budgets.pop()
            self.kube.delete_budget(ns, name)

        def one(i: int) -> tuple[str, str]:
            ns, pod = self.pod_name(i % self.pods)
            k = i % self.namespaces
            name = pod if i < self.pods else f"{pod}-b{i // self.pods}"
            self.kube.budget(
                ns,
                name,
                {
                    "database": {"secretRef": {"name": f"pg-{self.database(k)}"}},
                    "budget": {"maxConnections": 10, "scope": "Selected"},
                    "selector": {"matchLabels": {"app": pod}},
                },
            )
            return ns, name

        with ThreadPoolExecutor(max_workers=8) as pool:
            self.budgets += list(pool.map(one, range(len(self.budgets), n)))

    def databases_used(self) -> int:
        return len({self.database(i % self.namespaces) for i in range(len(self.budgets))})

    def open_backends(self, n: int) -> list[psycopg.Connection[Any]]:
        """``n`` idle client backends, dealt over the pods, named after them (application_name)."""

        def one(i: int) -> psycopg.Connection[Any]:
            _, pod = self.pod_name(i % self.pods)
            k = (i % self.pods) % self.namespaces
            return psycopg.connect(
                self.server.app_dsn(self.database(k)),
                autocommit=True,
                connect_timeout=10,
                application_name=pod,
                options="-c idle_session_timeout=0",
            )

        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(one, range(n)))

    def delete(self) -> None:
        self.kube.delete_namespaces([self.ns(k) for k in range(self.namespaces)], wait=120)


def _wait_all_probed(kube: Kube, fleet: Fleet, since: float, timeout: float = 120) -> float:
    """Wait until every budget reports a probe at or after ``since``; return how long it took."""
    want = set(fleet.budgets)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        done = {
            (b["metadata"]["namespace"], b["metadata"]["name"])
            for b in kube.budgets()
            if (t := (b.get("status") or {}).get("lastProbeTime")) and parse_time(t) >= since - 1
        }
        if want <= done:
            return time.monotonic() - t0
        time.sleep(1.0)
    raise RuntimeError(f"not every budget was probed within {timeout:.0f}s")


@dataclass
class Window:
    """What the operator did over one measurement window."""

    seconds: float
    rss_mb: list[float]
    cpu_percent: float
    probes: dict[str, float]  # budget -> probes in the window
    probe_seconds: float  # mean seconds per probe in the window

    def cadence(self, budgets: int) -> tuple[bool, Spread]:
        counts = list(self.probes.values()) + [0.0] * max(0, budgets - len(self.probes))
        return (
            bool(counts) and min(counts) >= expected_probes(self.seconds),
            Spread.of(counts),
        )


def measure(op: Operator, seconds: float, sample_every: float = 2.0) -> Window:
    """Memory (sampled), CPU and per-budget probes of the operator over ``seconds``."""
    m0 = probe_counts(op.metrics())
    c0, t0 = cpu_seconds(op.pid), time.monotonic()
    rss = [rss_mb(op.pid)]
    end = t0 + seconds
    while time.monotonic() < end:
        time.sleep(min(sample_every, max(0.0, end - time.monotonic())))
        rss.append(rss_mb(op.pid))
    c1, t1 = cpu_seconds(op.pid), time.monotonic()
    m1 = probe_counts(op.metrics())
    probes = {k: n - m0.get(k, (0.0, 0.0))[0] for k, (n, _) in m1.items()}
    total_n = sum(probes.values())
    total_s = sum(s - m0.get(k, (0.0, 0.0))[1] for k, (_, s) in m1.items())
    return Window(
        seconds=t1 - t0,
        rss_mb=rss,
        cpu_percent=100 * (c1 - c0) / (t1 - t0),
        probes=probes,
        probe_seconds=total_s / total_n if total_n else math.nan,
    )


def measure_footprint(
    sb: Sandbox, kube: Kube, fleet: Fleet, counts: Sequence[int], window: float, out_dir: Path
) -> dict[str, Any]:
    say(
        f"\n== 4. footprint: 1 operator, {', '.join(map(str, counts))} ConnectionBudgets over "
        f"{fleet.pods} pods in {fleet.namespaces} namespaces and {len(DATABASES)} databases, "
        f"poll {POLL}s; {window:.0f}s windows after every budget was probed"
    )
    rows: dict[str, Any] = {}
    for n in counts:
        fleet.scale_budgets(n)
        since = time.time()
        op = Operator.start(
            sb, [fleet.ns(k) for k in range(fleet.namespaces)], out_dir / f"operator-fp-{n}.log"
        )
        try:
            took = _wait_all_probed(kube, fleet, since)
            time.sleep(SETTLE_SECONDS)
            w = measure(op, window)
            held = fleet.server.client_backends(f"application_name = '{PROBE_APPLICATION_NAME}'")
            gauge = metric_samples(op.metrics(), "connbudget_monitor_connections")
            problems = op.problems()
        finally:
            op.stop()
        kept, spread = w.cadence(n)
        no_pods = sum(1 for p in problems if p.get("reason") == "NoPodsSelected")
        row = {
            "budgets": n,
            "first_probe_all_seconds": round(took, 1),
            "rss_mb": max(w.rss_mb),
            "rss_mb_median": statistics.median(w.rss_mb),
            "cpu_percent": w.cpu_percent,
            "probes_per_budget": spread,
            "expected_probes_min": expected_probes(w.seconds),
            "window_seconds": w.seconds,
            "cadence_kept": kept,
            "probe_ms_mean": w.probe_seconds * 1000,
            "db_connections": held,
            "db_connections_gauge": gauge[0][1] if gauge else None,
            "databases": fleet.databases_used(),
            "warnings": len(problems),
            "warnings_no_pods_selected": no_pods,
            "warning_samples": [_brief(p) for p in problems[:3]],
        }
        rows[str(n)] = row
        say(
            f"  {n:>3} budgets: RSS {row['rss_mb']:.1f} MB, CPU {w.cpu_percent:.2f}% of a core, "
            f"probes per budget in {w.seconds:.0f}s {spread.show('{:.0f}')} (cadence "
            f"{'kept' if kept else 'MISSED'}, at least {row['expected_probes_min']}), per-poll "
            f"probe {row['probe_ms_mean']:.1f} ms, DB connections {held} for "
            f"{row['databases']} databases, warnings logged {len(problems)}"
        )
    lo, hi = rows[str(counts[0])], rows[str(counts[-1])]
    span = counts[-1] - counts[0]
    marginal = {
        "rss_kb_per_budget": (hi["rss_mb"] - lo["rss_mb"]) * 1024 / span if span else math.nan,
        "cpu_percent_per_100_budgets": (hi["cpu_percent"] - lo["cpu_percent"]) * 100 / span
        if span
        else math.nan,
    }
    say(
        f"  marginal cost per budget: {marginal['rss_kb_per_budget']:.0f} KB resident, "
        f"{marginal['cpu_percent_per_100_budgets']:.2f}% of a core per 100 budgets"
    )
    return {
        "setup": footprint_setup(namespaces=fleet.namespaces, pods=fleet.pods),
        "rows": rows,
        "marginal": marginal,
    }


def load_soak(
    sb: Sandbox,
    kube: Kube,
    fleet: Fleet,
    *,
    minutes: float,
    out_dir: Path,
    budgets: int = LOAD_BUDGETS,
    backends: int = LOAD_BACKENDS,
    baseline_seconds: float = BASELINE_SECONDS,
) -> dict[str, Any]:
    """Run the load for ``minutes``; return memory, CPU, cadence and error figures.

    First, over the same backends and pods, one budget alone for ``baseline_seconds``: the CPU
    the soak's is compared with (CPU should grow with databases, not with budgets).
    """
    say(
        f"\n== load and soak: {budgets} budgets, {fleet.pods} pods, {backends} client backends, "
        f"{minutes:g} min"
    )
    fleet.scale_budgets(1)
    held = fleet.open_backends(backends)
    # Each backend runs a query about once a minute, as an app's pooled connection would: none
    # stays idle for leakDetection.idleSeconds (300 s), so none is (rightly) taken for a leak.
    turn = iter(range(10**9))

    def touch() -> None:
        for _ in range(len(held) // 120 + 1):
            held[next(turn) % len(held)].execute("SELECT 1")

    toucher = Ticker(touch, interval=0.5, limit=minutes * 60 + baseline_seconds + 900).start()
    series: list[tuple[float, float, float]] = []  # t, RSS MB, CPU % over the last sample
    minutes_out: list[dict[str, Any]] = []
    try:
        baseline = _one_budget_cpu(sb, kube, fleet, baseline_seconds, out_dir)
        fleet.scale_budgets(budgets)
        since = time.time()
        op = Operator.start(
            sb, [fleet.ns(k) for k in range(fleet.namespaces)], out_dir / "operator-soak.log"
        )
        try:
            _wait_all_probed(kube, fleet, since)
            time.sleep(SETTLE_SECONDS)
            got = fleet.server.client_backends("application_name LIKE 'p%'")
            say(f"  {got} client backends on the server; soaking")
            t_start = time.monotonic()
            soak_from = time.time()
            segments = max(1, round(minutes))
            seg_seconds = minutes * 60 / segments
            for s in range(segments):
                c0, t0 = cpu_seconds(op.pid), time.monotonic()
                w = measure(op, seg_seconds, sample_every=SOAK_SAMPLE_SECONDS)
                c1, t1 = cpu_seconds(op.pid), time.monotonic()
                for r in w.rss_mb:
                    series.append((t0 - t_start, r, w.cpu_percent))
                kept, spread = w.cadence(budgets)
                seg = {
                    "minute": s + 1,
                    "rss_mb": max(w.rss_mb),
                    "cpu_percent": 100 * (c1 - c0) / (t1 - t0),
                    "cadence_kept": kept,
                    "probes_per_budget": spread,
                    "expected_probes_min": expected_probes(w.seconds),
                    "probe_ms_mean": w.probe_seconds * 1000,
                }
                minutes_out.append(seg)
                say(
                    f"  minute {s + 1}: RSS {seg['rss_mb']:.1f} MB, CPU "
                    f"{seg['cpu_percent']:.2f}%, probes per budget {spread.show('{:.0f}')} "
                    f"(cadence {'kept' if kept else 'MISSED'}), per-poll probe "
                    f"{seg['probe_ms_mean']:.1f} ms"
                )
            text = op.metrics()
            probe_errors = sum(v for _, v in metric_samples(text, "connbudget_probe_errors_total"))
            action_count = sum(v for _, v in metric_samples(text, "connbudget_actions_total"))
            logged = op.problems()
            got_end = fleet.server.client_backends("application_name LIKE 'p%'")
        finally:
            op.stop()
    finally:
        toucher.stop()
        for c in held:
            c.close()
    problems = [p for p in logged if parse_time(str(p.get("time"))) >= soak_from]
    startup = [p for p in logged if parse_time(str(p.get("time"))) < soak_from]
    rss = [r for _, r, _ in series]
    first = statistics.median(rss[: max(1, len(rss) // 10)])
    last = statistics.median(rss[-max(1, len(rss) // 10) :])
    slope = _slope([(t / 60, r) for t, r, _ in series])
    result = {
        "budgets": budgets,
        "poll_seconds": POLL,
        "pods": fleet.pods,
        "backends": got,
        "backends_at_end": got_end,
        "touch_errors": len(toucher.errors),
        "minutes": minutes,
        "segments": minutes_out,
        "series": series,
        "cadence_kept": all(m["cadence_kept"] for m in minutes_out),
        "rss_first_mb": first,
        "rss_last_mb": last,
        "rss_growth_mb": last - first,
        "rss_slope_mb_per_min": slope,
        "memory_flat": abs(last - first) < FLAT_MB,
        "cpu_percent": Spread.of(m["cpu_percent"] for m in minutes_out),
        "baseline_cpu_percent": baseline,
        "cpu_vs_one_budget": Spread.of(m["cpu_percent"] / baseline for m in minutes_out)
        if baseline > 0
        else None,
        "probe_errors": probe_errors,
        "actions": action_count,
        "warnings": len(problems),
        "warning_samples": [_brief(p) for p in problems[:5]],
        "startup_warnings": len(startup),
        "startup_warning_samples": [_brief(p) for p in startup[:5]],
    }
    say(
        f"  soak: cadence {'kept' if result['cadence_kept'] else 'MISSED'} every minute; RSS "
        f"{first:.1f} -> {last:.1f} MB ({last - first:+.1f} MB, {slope:+.2f} MB/min, "
        f"{'flat' if result['memory_flat'] else 'NOT flat'}); probe errors {probe_errors:.0f}, "
        f"warnings or errors logged {len(problems)} (and {len(startup)} while starting), actions "
        f"{action_count:.0f}; {got_end} client backends at the end"
    )
    return result


def _one_budget_cpu(sb: Sandbox, kube: Kube, fleet: Fleet, seconds: float, out_dir: Path) -> float:
    """The CPU (% of a core) of an operator with one budget, over the fleet's backends."""
    since = time.time()
    op = Operator.start(
        sb, [fleet.ns(k) for k in range(fleet.namespaces)], out_dir / "operator-soak-one.log"
    )
    try:
        _wait_all_probed(kube, fleet, since)
        time.sleep(SETTLE_SECONDS)
        c0, t0 = cpu_seconds(op.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(op.pid), time.monotonic()
    finally:
        op.stop()
    cpu = 100 * (c1 - c0) / (t1 - t0)
    say(f"  one budget over the same backends: CPU {cpu:.2f}% of a core over {t1 - t0:.0f}s")
    return cpu


def _brief(record: dict[str, Any]) -> str:
    return " ".join(
        str(record.get(k)) for k in ("level", "message", "reason", "detail") if record.get(k)
    )


def _slope(points: Sequence[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def run(
    sb: Sandbox,
    kube: Kube,
    server: Server,
    *,
    counts: Sequence[int],
    window: float,
    footprint: bool,
    soak_minutes: float | None,
    out_dir: Path,
    charts: Path,
) -> dict[str, Any]:
    fleet = Fleet(kube=kube, server=server)
    t = time.monotonic()
    fleet.create()
    took = time.monotonic() - t
    say(f"  fleet: {fleet.pods} pods in {fleet.namespaces} namespaces, up in {took:.0f}s")
    out: dict[str, Any] = {}
    try:
        if footprint:
            out["footprint"] = measure_footprint(sb, kube, fleet, counts, window, out_dir)
            imported = import_rss_mb()
            out["footprint"]["import_rss_mb"] = imported
            out["footprint"]["import_rss_repeats"] = IMPORT_REPEATS
            say(
                f"  resident memory of a fresh interpreter after its imports (median of "
                f"{IMPORT_REPEATS}): "
                + ", ".join(f"{name} {mb:.1f} MB" for name, mb in imported.items())
            )
        if soak_minutes:
            out["load"] = load_soak(sb, kube, fleet, minutes=soak_minutes, out_dir=out_dir)
    finally:
        fleet.delete()
    _charts(out, charts)
    return out


def _charts(out: dict[str, Any], charts: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "footprint" in out:
        rows = list(out["footprint"]["rows"].values())
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        xs = [r["budgets"] for r in rows]
        ax.plot(xs, [r["rss_mb"] for r in rows], marker="o", label="resident memory (MB)")
        ax.axhline(
            RSS_TARGET_MB, color="#d62728", linestyle="--", label=f"target: {RSS_TARGET_MB:g} MB"
        )
        ax.set_xlabel("ConnectionBudgets")
        ax.set_ylabel("MB")
        ax2 = ax.twinx()
        ax2.plot(xs, [r["cpu_percent"] for r in rows], marker="s", color="#ff7f0e", label="CPU")
        ax2.axhline(
            CPU_TARGET_PERCENT,
            color="#ff7f0e",
            linestyle=":",
            label=f"target: {CPU_TARGET_PERCENT:g}% of a core",
        )
        ax2.set_ylabel("% of one core")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
        ax.set_title(f"Operator footprint by number of budgets (poll {POLL} s)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(charts / "footprint.png")
        plt.close(fig)
    if "load" in out:
        series = out["load"]["series"]
        fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
        ax.plot([t / 60 for t, _, _ in series], [r for _, r, _ in series], label="resident MB")
        ax.set_xlabel("minutes of soak")
        ax.set_ylabel("MB")
        ax.set_ylim(0, max(r for _, r, _ in series) * 1.3)
        ax2 = ax.twinx()
        ax2.plot(
            [t / 60 for t, _, _ in series],
            [c for _, _, c in series],
            color="#ff7f0e",
            label="CPU (% of a core)",
        )
        ax2.set_ylabel("% of one core")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)
        ld = out["load"]
        ax.set_title(f"Soak: {ld['budgets']} budgets, {ld['pods']} pods, {ld['backends']} backends")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(charts / "soak.png")
        plt.close(fig)
