"""Command line of the sandbox (``tests/sandbox/sandbox``)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from sandbox.core import Sandbox, all_sandboxes


def _progress(msg: str) -> None:
    print(f"sandbox: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sandbox", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a sandbox and make it the current one")
    up.add_argument(
        "--max-connections", type=int, default=100, help="PostgreSQL max_connections (default 100)"
    )
    sub.add_parser("env", help="print export lines for the current sandbox")
    sub.add_parser("status", help="show the current sandbox as JSON")
    down = sub.add_parser("down", help="stop the current sandbox")
    down.add_argument("--all", action="store_true", help="stop every sandbox on this machine")
    args = parser.parse_args(argv)

    if args.command == "up":
        if Sandbox.current() is not None:
            _progress("a sandbox is already up; `sandbox down` first")
            return 1
        sb = Sandbox.up(max_connections=args.max_connections, progress=_progress)
        sb.mark_current()
        _progress('now run: eval "$(tests/sandbox/sandbox env)"')
        return 0

    if args.command == "down" and args.all:
        for sb in all_sandboxes():
            _progress(f"stopping {sb.state_dir}")
            sb.down(_progress)
        return 0

    current = Sandbox.current()
    if current is None:
        _progress("no sandbox is up; start one with `tests/sandbox/sandbox up`")
        return 1
    if args.command == "env":
        for key, value in current.env().items():
            print(f"export {key}={shlex.quote(value)}")
    elif args.command == "status":
        print(json.dumps(current.status(), indent=2))
    elif args.command == "down":
        current.down(_progress)
        _progress("sandbox stopped and removed")
    return 0
