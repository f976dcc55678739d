"""The fault run of issue 12 as a benchmark: ``tests/bench/faults`` (30 minutes by default).

Two operator replicas on a fresh sandbox while leaky, pooled and steady workloads run, and faults
injected from a seeded RNG (the seed is printed; ``--seed`` replays it). Invariants are judged from
outside the operator (``tests/faults/checks.py``); the report is printed and written to
``tests/bench/faults.json``. Exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import secrets
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, machine, say
from faults import run as fault_run
from sandbox.core import Sandbox

RESULTS = ROOT / "tests" / "bench" / "faults.json"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tests/bench/faults", description=__doc__)
    parser.add_argument("--seed", type=int, default=None, help="replay this seed")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--real-apps", action="store_true", help="also run a psycopg pool app")
    parser.add_argument(
        "--sandbox-dir", type=Path, default=None, help="use this running sandbox (else a new one)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    work = Path(tempfile.mkdtemp(prefix="connbudget-faults-"))
    say(f"fault run: seed {seed}, {args.minutes:g} min, logs in {work}")
    own = args.sandbox_dir is None
    sb = Sandbox.up(progress=lambda m: say(f"sandbox: {m}")) if own else Sandbox(args.sandbox_dir)
    try:
        report = fault_run.run(
            sb,
            seed=seed,
            duration=args.minutes * 60,
            out_dir=work,
            namespace=f"faults-{secrets.token_hex(3)}",
            real_apps=args.real_apps,
        )
    finally:
        if own:
            sb.down()
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "logs": str(work),
        **report,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {args.output}")
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
