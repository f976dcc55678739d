"""Test-suite wiring: the sandbox fixtures, and teardown on SIGTERM as on Ctrl-C."""

from __future__ import annotations

import signal

pytest_plugins = ["sandbox.fixtures"]


def _terminate(signum: int, frame: object) -> None:
    # pytest runs fixture finalizers on KeyboardInterrupt, so a CI timeout's SIGTERM still tears
    # the sandbox down.
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _terminate)
