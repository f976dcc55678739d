"""A real Prometheus for the tests and the demo: Debian's binary, on loopback, in its own folder.

``Prometheus.start`` writes a configuration that scrapes the given targets (every second by
default) and evaluates the given rule files (every second by default), starts
``/usr/bin/prometheus`` on a free loopback port with its data in the folder, and waits until it
is ready; ``stop`` ends it (its process group, SIGKILL after a grace). Its HTTP API is read with
``query``, ``query_range``, ``series``, ``label_values``, ``alerts`` and ``rules``.

The chart's alert rules and dashboard come from the chart itself: ``chart_rule_groups`` renders
the PrometheusRule with ``helm template`` and returns its groups, ready for a rule file;
``load_dashboard``, ``panel_queries`` and ``substitute`` read the dashboard's panel queries with
its template variables filled in, as Grafana would send them.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sandbox.procs import alive, free_port, spawn, stop_pid

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "manifests" / "helm" / "connbudget"
DASHBOARD = CHART / "dashboards" / "connbudget.json"
KUBE_VERSION = "1.36.0"  # what `helm template` assumes: the sandbox's Kubernetes minor
START_TIMEOUT = 30.0  # seconds for Prometheus to answer /-/ready (about 1 s here)
STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL
HTTP_TIMEOUT = 10.0  # seconds for one API request
START_ATTEMPTS = 3  # a free port can be taken between choosing and binding it
LOOPBACK = "127.0.0.1"


class PrometheusError(RuntimeError):
    """Prometheus could not be started, or its API answered with an error."""


def find_tool(name: str) -> Path:
    """Return the path of ``prometheus`` or ``promtool`` (Debian's package, which tests/setup
    installs); raise ``PrometheusError`` naming the fix if it is missing."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else "")
    if not found:
        raise PrometheusError(f"{name} is not installed: run tests/setup (Debian's prometheus)")
    return Path(found)


def helm_template(helm: Path, *sets: str, show_only: str | None = None) -> list[dict[str, Any]]:
    """Render the chart with ``helm template`` and ``--set`` each of ``sets``; return its objects.

    ``show_only`` names one template (``templates/prometheusrule.yaml``).
    """
    argv = [str(helm), "template", "connbudget", str(CHART), "--kube-version", KUBE_VERSION]
    argv += [a for s in sets for a in ("--set", s)]
    if show_only:
        argv += ["--show-only", show_only]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if res.returncode != 0:
        raise PrometheusError(f"helm template {' '.join(sets)}: {res.stderr.strip()}")
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def chart_rule_groups(helm: Path, *sets: str) -> list[dict[str, Any]]:
    """The rule groups of the chart's PrometheusRule (rendered with it enabled)."""
    objs = helm_template(
        helm,
        "metrics.prometheusRule.enabled=true",
        *sets,
        show_only="templates/prometheusrule.yaml",
    )
    rules = [o for o in objs if o.get("kind") == "PrometheusRule"]
    if len(rules) != 1:
        raise PrometheusError(f"expected one PrometheusRule, rendered {len(rules)}")
    groups: list[dict[str, Any]] = rules[0]["spec"]["groups"]
    return groups


def write_rules(path: Path, groups: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``groups`` as a Prometheus rule file at ``path``; return ``path``."""
    path.write_text(yaml.safe_dump({"groups": list(groups)}, sort_keys=False))
    return path


def alert_rules(groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every alerting rule of ``groups``."""
    return [dict(r) for g in groups for r in g["rules"] if "alert" in r]


def with_for(
    groups: Sequence[Mapping[str, Any]], alert: str, duration: str
) -> list[dict[str, Any]]:
    """``groups`` with the ``for:`` of ``alert`` set to ``duration`` (a test or a demo shorter
    than the chart's wait); raise ``PrometheusError`` if there is no such alert."""
    found = False
    changed: list[dict[str, Any]] = []
    for group in groups:
        rules = []
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                found = True
                rule = {**rule, "for": duration}
            rules.append(dict(rule))
        changed.append({**group, "rules": rules})
    if not found:
        raise PrometheusError(f"the chart has no alert {alert}")
    return changed


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    """The chart's Grafana dashboard, as JSON."""
    board: dict[str, Any] = json.loads(path.read_text())
    return board


@dataclass(frozen=True)
class PanelQuery:
    """One query of one dashboard panel."""

    panel: str
    ref: str
    expr: str


def dashboard_panels(board: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel of ``board`` that is not a row (panels inside collapsed rows included)."""
    found: list[dict[str, Any]] = []
    for p in board.get("panels", []):
        if p.get("type") == "row":
            found.extend(p.get("panels", []))
        else:
            found.append(p)
    return found


def panel_queries(board: Mapping[str, Any]) -> list[PanelQuery]:
    """Every panel's Prometheus queries, in the dashboard's order."""
    return [
        PanelQuery(panel=str(p["title"]), ref=str(t.get("refId", "")), expr=str(t["expr"]))
        for p in dashboard_panels(board)
        for t in p.get("targets", [])
        if t.get("expr")
    ]


def variable_queries(board: Mapping[str, Any]) -> dict[str, str]:
    """The dashboard's query variables: name to its ``label_values(...)`` query."""
    found: dict[str, str] = {}
    for v in board.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            found[str(v["name"])] = str(q["query"] if isinstance(q, dict) else q)
    return found


LABEL_VALUES = re.compile(r"label_values\((.*),\s*(\w+)\s*\)", re.DOTALL)
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Fill in Grafana's template variables (``$x``, ``${x}``, ``[[x]]``) from ``values``.

    Raises:
        KeyError: a variable of ``expr`` has no value in ``values``.
    """

    def one(m: re.Match[str]) -> str:
        name = next(g for g in m.groups() if g)
        return values[name]

    return VARIABLE.sub(one, expr)


def variables_of(expr: str) -> set[str]:
    """The template variables ``expr`` uses."""
    return {next(g for g in m.groups() if g) for m in VARIABLE.finditer(expr)}


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``promtool`` (bounded); the caller checks its return code and output."""
    return subprocess.run(
        [str(find_tool("promtool")), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


@dataclass(frozen=True)
class Target:
    """A scrape target: ``host:port`` serving ``/metrics``, with the job's settings."""

    address: str
    job: str = "connbudget"
    labels: Mapping[str, str] = field(default_factory=dict)
    honor_labels: bool = False


def scrape_config(
    targets: Sequence[Target],
    rule_files: Sequence[Path],
    *,
    scrape_interval: float,
    evaluation_interval: float,
) -> dict[str, Any]:
    """The configuration file's content: one job per target job name."""
    jobs: dict[str, list[Target]] = {}
    for t in targets:
        jobs.setdefault(t.job, []).append(t)
    return {
        "global": {
            "scrape_interval": f"{scrape_interval:g}s",
            "scrape_timeout": f"{scrape_interval:g}s",
            "evaluation_interval": f"{evaluation_interval:g}s",
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "honor_labels": any(t.honor_labels for t in ts),
                "static_configs": [{"targets": [t.address], "labels": dict(t.labels)} for t in ts],
            }
            for job, ts in jobs.items()
        ],
    }


@dataclass
class Prometheus:
    """A running Prometheus, and its HTTP API."""

    folder: Path
    port: int
    pid: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @classmethod
    def start(
        cls,
        folder: Path,
        targets: Sequence[Target],
        *,
        tag: str,
        rule_files: Sequence[Path] = (),
        scrape_interval: float = 1.0,
        evaluation_interval: float = 1.0,
        port: int | None = None,
        timeout: float = START_TIMEOUT,
    ) -> Prometheus:
        """Start Prometheus with its configuration, data and log in ``folder``; wait until ready.

        ``tag`` marks the process as the sandbox's processes are (``sandbox.procs``), so a
        sandbox's teardown stops it too. Raises ``PrometheusError`` with its log's end if it
        exits or is not ready within ``timeout`` seconds.
        """
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                scrape_config(
                    targets,
                    rule_files,
                    scrape_interval=scrape_interval,
                    evaluation_interval=evaluation_interval,
                ),
                sort_keys=False,
            )
        )
        check = run_promtool("check", "config", str(config))
        if check.returncode != 0:
            raise PrometheusError(f"promtool check config: {check.stdout}{check.stderr}")
        log = folder / "prometheus.log"
        last = ""
        for _ in range(START_ATTEMPTS):
            chosen = port or free_port(LOOPBACK)
            proc = spawn(
                [
                    str(find_tool("prometheus")),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    "--storage.tsdb.retention.time=1d",
                    f"--web.listen-address={LOOPBACK}:{chosen}",
                    "--log.level=warn",
                ],
                tag=tag,
                log=log,
                cwd=folder,
            )
            prom = cls(folder=folder, port=chosen, pid=proc.pid, log=log)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if prom.ready():
                    return prom
                time.sleep(0.2)
            last = log.read_text(errors="replace")[-2000:]
            prom.stop()
            if port is not None or "address already in use" not in last:
                break
        raise PrometheusError(f"Prometheus did not start; its log ends:\n{last}")

    def stop(self) -> None:
        """Stop it: SIGTERM to its process group, SIGKILL after a grace."""
        if alive(self.pid):
            stop_pid(self.pid, grace=STOP_GRACE)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:  # noqa: S310 (loopback)
                return bool(r.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str | Sequence[str]) -> Any:
        """GET ``/api/v1/<path>``; return its ``data``, or raise ``PrometheusError``."""
        query = urllib.parse.urlencode(params, doseq=True)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as r:  # noqa: S310 (loopback)
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's vector (each ``metric`` and ``value``)."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        data = self.api("query", **params)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else []
        return result

    def query_range(
        self, expr: str, start: float, end: float, step: float = 1.0
    ) -> list[dict[str, Any]]:
        """A range query's matrix (each ``metric`` and ``values``)."""
        data = self.api(
            "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}"
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    def series(self, match: str, start: float, end: float) -> list[dict[str, str]]:
        """The label sets of the series ``match`` selects between ``start`` and ``end``."""
        found: list[dict[str, str]] = self.api(
            "series", **{"match[]": [match], "start": f"{start:.3f}", "end": f"{end:.3f}"}
        )
        return found

    def label_values(self, label: str, match: str) -> list[str]:
        """The values of ``label`` among the series ``match`` selects."""
        found: list[str] = self.api(f"label/{label}/values", **{"match[]": [match]})
        return found

    def variable_values(self, query: str) -> list[str]:
        """What Grafana lists for a variable defined by ``label_values(selector, label)``."""
        m = LABEL_VALUES.fullmatch(query.strip())
        if not m:
            raise PrometheusError(f"not a label_values() query: {query}")
        return self.label_values(m.group(2), m.group(1).strip())

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts now pending or firing."""
        found: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return found

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule, with its health, last error and evaluation time."""
        return [r for g in self.api("rules")["groups"] for r in g["rules"]]

    def targets_up(self) -> bool:
        """Whether every target was scraped, and its last scrape worked."""
        active = self.api("targets", state="active")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def wait(
        self, check: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.5
    ) -> Any:
        """Call ``check`` until it returns something truthy, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            got = check()
            if got:
                return got
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what}: not within {timeout:g}s")
            time.sleep(interval)


@contextlib.contextmanager
def running(
    folder: Path,
    targets: Sequence[Target],
    *,
    tag: str,
    rule_files: Sequence[Path] = (),
    scrape_interval: float = 1.0,
    evaluation_interval: float = 1.0,
) -> Iterator[Prometheus]:
    """A Prometheus for the ``with`` block, stopped when it ends."""
    prom = Prometheus.start(
        folder,
        targets,
        tag=tag,
        rule_files=rule_files,
        scrape_interval=scrape_interval,
        evaluation_interval=evaluation_interval,
    )
    try:
        yield prom
    finally:
        prom.stop()


LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
PANEL_UNITS = {"percentunit": ("%", 100.0), "s": ("s", 1.0), "cps": ("/s", 1.0)}
ROW_HEIGHT = 0.45  # inches per unit of Grafana's grid height


def legend(template: str, labels: Mapping[str, str]) -> str:
    """A Grafana legend format (``{{owner}} ({{budget}})``) filled in from a series' labels."""
    return LEGEND.sub(lambda m: labels.get(m.group(1), ""), template)


def render_dashboard(
    prom: Prometheus,
    board: Mapping[str, Any],
    values: Mapping[str, str],
    start: float,
    end: float,
    path: Path,
    *,
    title: str = "",
) -> Path:
    """Draw every panel of ``board`` where Grafana puts it, from ``prom``'s data between
    ``start`` and ``end`` (variables filled in from ``values``), into a PNG at ``path``.

    A sketch of the dashboard for a README, not Grafana: time series as lines (or steps), bar
    gauges as bars of the last value, stats as the last value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(board.get("panels", []))
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(18, height * ROW_HEIGHT), dpi=90)
    grid = fig.add_gridspec(height, 24, hspace=2.5, wspace=2.5, top=0.95, bottom=0.03)
    step = max(1.0, (end - start) / 300)
    for p in panels:
        g = p["gridPos"]
        ax = fig.add_subplot(grid[g["y"] : g["y"] + g["h"], g["x"] : g["x"] + g["w"]])
        if p.get("type") == "row":
            ax.axis("off")
            ax.text(0, 0.5, p["title"], fontsize=13, fontweight="bold", va="center")
            continue
        unit, scale = PANEL_UNITS.get(
            p.get("fieldConfig", {}).get("defaults", {}).get("unit"), ("", 1.0)
        )
        ax.set_title(p["title"] + (f" ({unit})" if unit else ""), fontsize=10, loc="left")
        series: list[tuple[str, list[float], list[float]]] = []
        for t in p.get("targets", []):
            for r in prom.query_range(substitute(t["expr"], values), start, end, step):
                label = legend(str(t.get("legendFormat", "")), r["metric"])
                xs = [float(x) - start for x, _ in r["values"]]
                ys = [float(v) * scale for _, v in r["values"]]
                series.append((label, xs, ys))
        if p.get("type") == "bargauge":
            names = [s[0] for s in series]
            ax.barh(names, [s[2][-1] for s in series], color="#3274d9")
            ax.tick_params(labelsize=7)
        elif p.get("type") == "stat":
            ax.axis("off")
            last = sum(s[2][-1] for s in series)
            ax.text(0.5, 0.4, f"{last:g}", fontsize=28, ha="center", va="center")
        else:
            bars = p.get("fieldConfig", {}).get("defaults", {}).get("custom", {}).get("drawStyle")
            for label, xs, ys in series:
                if bars == "bars":
                    ax.step(xs, ys, where="post", label=label, linewidth=1)
                else:
                    ax.plot(xs, ys, label=label, linewidth=1.2)
            ax.set_xlabel("seconds", fontsize=7)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if series:
                ax.legend(fontsize=6, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=14)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
