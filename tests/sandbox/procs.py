"""Process helpers for the sandbox: spawning tagged daemons, stopping them, waiting for ports.

Every process the sandbox starts carries the environment variable ``CONNBUDGET_SANDBOX`` set to the
sandbox's state folder, and so do its children. Teardown finds leftovers by that tag in ``/proc``,
so a sandbox can be cleaned up even after the process that created it was killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

TAG_VAR = "CONNBUDGET_SANDBOX"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def spawn(
    argv: Sequence[str],
    *,
    tag: str,
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached in its own session, tagged, its output appended to ``log``."""
    full_env = dict(os.environ if env is None else env)
    full_env[TAG_VAR] = tag
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
            user=user,
        )


def alive(pid: int) -> bool:
    """Tell whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def stop_pid(
    pid: int, *, grace: float = 10.0, group: bool = True, sig: int = signal.SIGTERM
) -> None:
    """Send ``sig`` to ``pid`` (its process group if ``group``), SIGKILL after ``grace`` seconds."""
    send: Callable[[int, int], None] = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError, PermissionError):
        send(pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pid)
        if not alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        send(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.05)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def tagged_pids(tag: str) -> Iterator[int]:
    """Yield the pids of every live process whose environment carries ``tag``."""
    needle = f"{TAG_VAR}={tag}".encode() + b"\0"
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                data = f.read()
        except OSError:
            continue
        if needle in data and alive(int(entry.name)):
            yield int(entry.name)


def kill_tagged(tag: str, *, grace: float = 5.0) -> int:
    """Stop every process tagged ``tag``: SIGTERM, then SIGKILL. Return how many there were."""
    pids = list(tagged_pids(tag))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        for p in pids:
            _reap(p)
        time.sleep(0.05)
    for pid in list(tagged_pids(tag)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def wait_for(
    what: str,
    check: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.1,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Poll ``check`` until True; fail with the tail of ``log`` if ``proc`` dies or time is up."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}{_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} was not ready within {timeout:.0f}s{_tail(log)}")
        time.sleep(interval)


def _tail(log: Path | None, lines: int = 25) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {log}:\n" + "\n".join(text)


def run(
    argv: Sequence[str], *, check: bool = True, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run a short command and capture its output as text; raise with its stderr on failure."""
    res = subprocess.run(list(argv), capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res  # type: ignore[no-any-return]


def pgbouncer_pid(sandbox_tag: str, pod: str) -> int | None:
    """The pid of the pgbouncer process running in the sandbox pod ``pod`` (None: none runs)."""
    needle = f"HOSTNAME={pod}".encode() + b"\0"
    tag = f"CONNBUDGET_SANDBOX={sandbox_tag}".encode() + b"\0"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if comm == "pgbouncer" and needle in environ and tag in environ:
            return int(entry.name)
    return None
