"""What both workloads share: JSON log lines, SIGTERM handling, settings from the environment."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
import threading


def log(event: str, **fields: object) -> None:
    """Print one JSON log line (never a DSN: only counts, states and error classes)."""
    line: dict[str, object] = {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "event": event,
    }
    line.update(fields)
    print(json.dumps(line, default=str), flush=True)


def stop_event() -> threading.Event:
    """An event that SIGTERM and SIGINT set, so the main loop can stop cleanly."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        sys.exit(f"{name} must be a number, not {os.environ[name]!r}")


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        sys.exit(f"{name} must be an integer, not {os.environ[name]!r}")


def database_url() -> str:
    url = os.environ.get("DATABASE_URL", "")
    if not url:
        sys.exit("DATABASE_URL is not set: give the pod the DSN to connect to")
    return url
