"""The benchmark suite: ``tests/bench/run`` (see BENCHMARKS.md for what it measures and found).

It brings up one sandbox, starts its own PostgreSQL servers inside it for each benchmark, prints
every figure as it is measured, writes ``BENCHMARKS.md``, ``tests/bench/results.json`` and the
charts in ``tests/bench/charts/``, and tears everything down. Bounded in time: each phase has a
fixed length and every wait a timeout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import exhaustion, harm, latency, probecost, report, shards
from bench import footprint as fleet_bench
from bench.common import ROOT, Kube, Server, machine, say
from sandbox.core import Sandbox

PHASES = report.PHASES
BIG_MAX_CONNECTIONS = 1300  # 1,000 backends, the latency episodes and headroom


def operator_source() -> str:
    """Which operator code runs: a commit of this repository, or another copy of it."""
    import subprocess

    import connbudget

    where = Path(connbudget.__file__).resolve().parents[1]
    commit = (
        os.environ.get("CONNBUDGET_BENCH_COMMIT")
        or subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    )
    if where == ROOT / "operator":
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "operator"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return f"commit {commit}" + (" with local changes" if dirty else "")
    return f"commit {commit} (a copy in {where})"


def merged(previous: dict[str, Any], phases: set[str]) -> dict[str, Any]:
    """The previous results without the phases about to run, each kept phase tagged with the run
    it came from (``from_run``), so the report can say so."""
    keys = ("date", "machine", "quick", "repeats", "operator", "total_seconds")
    origin = {k: previous[k] for k in keys if k in previous}
    kept: dict[str, Any] = {}
    for phase in PHASES:
        if phase in previous and phase not in phases:
            kept[phase] = previous[phase]
            if isinstance(kept[phase], dict) and "from_run" not in kept[phase]:
                kept[phase] = {**kept[phase], "from_run": origin}
    return kept


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tests/bench/run", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="short phases and few repeats (for development)"
    )
    parser.add_argument("--only", action="append", choices=PHASES, help="run only these phases")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other phases' figures from the existing results.json (with --only)",
    )
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=None,
        help="leak rates of the exhaustion scenario (connections per second; default 1 7 20)",
    )
    parser.add_argument(
        "--scenario",
        action="append",
        default=None,
        help="run only these scenarios of the harm phase (e.g. start, pg-restart, leak-7)",
    )
    parser.add_argument("--skip-soak", action="store_true", help="leave out the load and soak")
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="repeats of benchmark 3 (the exhaustion scenario plays each rate once)",
    )
    parser.add_argument("--episodes", type=int, default=None, help="episodes per poll interval")
    parser.add_argument(
        "--shard-budgets",
        type=int,
        default=None,
        help=f"budgets of the shards phase (default {shards.BUDGETS}; 500 with --quick)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT,
        help="where BENCHMARKS.md goes (charts and results.json go under tests/bench/)",
    )
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    phases = set(args.only or PHASES)
    if args.skip_soak:
        phases.discard("load")
    repeats = args.repeats or (1 if quick else 3)
    episodes = args.episodes or (6 if quick else 20)
    soak = 1.0 if quick else float(args.soak_minutes)
    charts = ROOT / "tests" / "bench" / "charts"
    charts.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="connbudget-bench-"))
    started = time.time()
    run_info = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "quick": quick,
        "repeats": repeats,
        "operator": operator_source(),
    }
    out = ROOT / "tests" / "bench" / "results.json"
    results: dict[str, Any] = dict(run_info)
    previous_harm: dict[str, Any] | None = None
    if args.merge and out.exists():
        # The other phases keep their figures, each with the run it came from; with --scenario,
        # the harm phase's other scenarios too.
        previous = report.from_json(json.loads(out.read_text()))
        previous_harm = previous.get("harm")
        results = merged(previous, phases)
        results.update(run_info)
    say(f"connbudget benchmarks on {results['machine']}; logs in {work}")

    def save() -> None:
        """Write results.json as it stands: a phase that fails later loses only itself."""
        out.write_text(json.dumps(results, indent=2, default=report.to_json) + "\n")

    sb = Sandbox.up(progress=lambda m: say(f"sandbox: {m}"))
    try:
        kube = Kube(sb)
        kube.install_crd()
        if "harm" in phases:
            chosen = set(args.scenario or [])
            found = harm.run_phase(
                sb,
                kube,
                quick=quick,
                out_dir=work,
                only=lambda s: not chosen or s.key in chosen,
            )
            kept = previous_harm if chosen and args.merge else None
            results["harm"] = harm.merge(kept, found) if kept else found
            save()
        if "exhaustion" in phases:
            results["exhaustion"] = exhaustion.run(
                sb,
                kube,
                window=45.0 if quick else 120.0,
                warmup=10.0 if quick else 20.0,
                out_dir=work,
                charts=charts,
                rates=tuple(args.rates or exhaustion.RATES),
            )
            save()
        if phases & {"latency", "probe", "footprint", "load", "shards"}:
            big = Server.start(sb, "big", max_connections=BIG_MAX_CONNECTIONS)
            try:
                if "latency" in phases:
                    results["latency"] = latency.run(
                        sb, kube, big, episodes=episodes, out_dir=work, charts=charts
                    )
                    save()
                if "probe" in phases:
                    results["probe"] = probecost.run(big, repeats=repeats, quick=quick)
                    save()
                if phases & {"footprint", "load"}:
                    results.update(
                        fleet_bench.run(
                            sb,
                            kube,
                            big,
                            counts=(1, 20, 100) if quick else (1, 100, 500, 1000),
                            window=30.0 if quick else 40.0,
                            footprint="footprint" in phases,
                            soak_minutes=soak if "load" in phases else None,
                            out_dir=work,
                            charts=charts,
                        )
                    )
                    save()
                if "shards" in phases:
                    results["shards"] = shards.run(
                        sb,
                        kube,
                        big,
                        budgets=args.shard_budgets or (500 if quick else shards.BUDGETS),
                        out_dir=work,
                    )
            finally:
                big.stop()
    finally:
        sb.down()
        say("sandbox torn down")
    results["total_seconds"] = round(time.time() - started)
    faults = ROOT / "tests" / "bench" / "faults.json"
    if faults.exists():
        # The fault run is its own command (tests/bench/faults): its last figures are reported.
        results["faults"] = json.loads(faults.read_text())
    results["phases_run"] = sorted(phases & set(PHASES) & set(results))
    say(f"\nall done in {results['total_seconds'] / 60:.1f} min")
    out.write_text(json.dumps(results, indent=2, default=report.to_json) + "\n")
    args.output.mkdir(parents=True, exist_ok=True)
    md = args.output / "BENCHMARKS.md"
    md.write_text(report.render(results))
    say(f"wrote {md}, {out} and the charts in {charts}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
