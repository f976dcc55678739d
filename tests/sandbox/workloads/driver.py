"""The HTTP driver: sends an app's traffic from a second container of the app's own pod.

The containers of a pod share its network namespace, so the app is at ``127.0.0.1``. Traffic
goes only to loopback or to the sandbox's pod network (198.18.0.0/15); any other target is refused.
It drives for ``DRIVE_SECONDS``, logs ``done`` with the totals, and then idles until stopped (a
container that exited would be restarted and drive again).

Three kinds of traffic, each off unless set (environment):
- ``DRIVE_LANES`` closed-loop lanes (healthy pools): each sends a request, waits for the answer,
  then waits a gap drawn from ``REUSE_GAP_MIN``..``REUSE_GAP_MAX`` seconds (default 5..120)
  before the next, so an app with one connection per lane sees each one reused after such a gap;
- ``DRIVE_RATE`` requests per second, open loop (a request does not wait for the previous one);
- ``LEAK_RATE`` abandoned requests per second: each asks ``LEAK_PATH`` to hold its connection
  ``INFLIGHT_IDLE_MIN``..``INFLIGHT_IDLE_MAX`` seconds between two queries, and hangs up after
  ``ABANDON_AFTER`` seconds (default 0.5), after the first query and before the answer: a client
  that gave up, as browsers and proxies do. Under Django 5.0.1's ASGI handler each one leaks the
  request's connection (ticket #35059).
- ``BURST_SIZE_MAX`` concurrent requests (at least ``BURST_SIZE_MIN``, default 1) every
  ``BURST_EVERY_MIN``..``BURST_EVERY_MAX`` seconds (default 30..110): sparse bursts, as an app
  serving a few users does, so a pool opens several connections at once and leaves them idle.
Of lane, rate and burst requests, ``INFLIGHT_FRACTION`` (default 0.2) hold their connection idle
``INFLIGHT_IDLE_MIN``..``INFLIGHT_IDLE_MAX`` seconds (default 1..3) between two queries.
``QUIET_AFTER`` and ``QUIET_SECONDS``: no lane, rate or burst request is sent from that many seconds
after the start for that long (a quiet hour, compressed); the lanes then all resume at once.

Other settings: ``TARGET_HOST`` (default 127.0.0.1), ``TARGET_PORT`` (8000), ``DRIVE_PATH``
(``/work``), ``LEAK_PATH`` (``/awork``), ``REQUEST_TIMEOUT`` (30 s), ``READY_TIMEOUT`` (120 s to
wait for the app's ``/healthz``). One JSON line per request: ``event`` ``sent``, ``outcome`` (see
``sandbox.workloads.outcomes``), ``kind`` (``lane``, ``rate``, ``leak``), ``status``, ``ms``.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import random
import socket
import sys
import threading
import time
from collections import Counter

from sandbox.workloads.common import env_float, env_int, log, stop_event

POD_NETWORK = ipaddress.ip_network("198.18.0.0/15")


def allowed_target(host: str) -> bool:
    """Only loopback and the sandbox's pod network."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return addr.is_loopback or addr in POD_NETWORK


class Driver:
    def __init__(self) -> None:
        self.host = os.environ.get("TARGET_HOST", "127.0.0.1")
        self.port = env_int("TARGET_PORT", 8000)
        self.path = os.environ.get("DRIVE_PATH", "/work")
        self.leak_path = os.environ.get("LEAK_PATH", "/awork")
        self.seconds = env_float("DRIVE_SECONDS", 60.0)
        self.lanes = env_int("DRIVE_LANES", 0)
        self.rate = env_float("DRIVE_RATE", 0.0)
        self.leak_rate = env_float("LEAK_RATE", 0.0)
        self.gap = (env_float("REUSE_GAP_MIN", 5.0), env_float("REUSE_GAP_MAX", 120.0))
        self.inflight_fraction = env_float("INFLIGHT_FRACTION", 0.2)
        self.inflight_idle = (
            env_float("INFLIGHT_IDLE_MIN", 1.0),
            env_float("INFLIGHT_IDLE_MAX", 3.0),
        )
        self.burst_size = (env_int("BURST_SIZE_MIN", 1), env_int("BURST_SIZE_MAX", 0))
        self.burst_every = (env_float("BURST_EVERY_MIN", 30.0), env_float("BURST_EVERY_MAX", 110.0))
        self.quiet = (env_float("QUIET_AFTER", -1.0), env_float("QUIET_SECONDS", 0.0))
        self.started = time.monotonic()
        self.abandon_after = env_float("ABANDON_AFTER", 0.5)
        self.timeout = env_float("REQUEST_TIMEOUT", 30.0)
        self.ready_timeout = env_float("READY_TIMEOUT", 120.0)
        self.stop = stop_event()
        self.totals: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.rng = random.Random()

    def settings(self) -> dict[str, object]:
        return {
            "target": f"{self.host}:{self.port}",
            "seconds": self.seconds,
            "lanes": self.lanes,
            "rate": self.rate,
            "leak_rate": self.leak_rate,
            "reuse_gap": list(self.gap),
            "inflight_fraction": self.inflight_fraction,
            "inflight_idle": list(self.inflight_idle),
            "abandon_after": self.abandon_after,
            "burst_size": list(self.burst_size),
            "burst_every": list(self.burst_every),
            "quiet": list(self.quiet),
        }

    def wait_quiet(self) -> None:
        """Wait out the quiet period, if now is in it."""
        after, seconds = self.quiet
        if after < 0 or seconds <= 0:
            return
        begins = self.started + after
        ends = begins + seconds
        now = time.monotonic()
        if begins <= now < ends:
            self.stop.wait(ends - now)

    def _idle(self) -> float:
        if self.rng.random() < self.inflight_fraction:
            return round(self.rng.uniform(*self.inflight_idle), 2)
        return 0.0

    def _record(self, kind: str, outcome: str, started: float, **fields: object) -> None:
        with self.lock:
            self.totals[outcome] += 1
        ms = round((time.monotonic() - started) * 1000)
        log("sent", kind=kind, outcome=outcome, ms=ms, **fields)

    def request(self, kind: str) -> None:
        """One request; its outcome is the app's (from the answer), or ``error``."""
        idle = self._idle()
        started = time.monotonic()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("GET", f"{self.path}?idle={idle}")
            resp = conn.getresponse()
            body = resp.read()
            try:
                outcome = str(json.loads(body).get("outcome", "error"))
            except (ValueError, AttributeError):
                outcome = "error"
            self._record(kind, outcome, started, status=resp.status, idle=idle)
        except (OSError, http.client.HTTPException) as e:
            self._record(kind, "error", started, status=0, idle=idle, error=type(e).__name__)
        finally:
            conn.close()

    def abandon(self) -> None:
        """A request whose client hangs up after ``abandon_after`` seconds."""
        idle = round(self.rng.uniform(*self.inflight_idle), 2)
        started = time.monotonic()
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout) as s:
                s.sendall(
                    f"GET {self.leak_path}?idle={idle} HTTP/1.1\r\nHost: {self.host}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                s.settimeout(self.abandon_after)
                try:
                    head = s.recv(4096)
                except TimeoutError:
                    head = b""
            # Closing the socket before the answer is the client going away.
            if head:
                self._record("leak", "ok", started, status=int(head.split()[1]), idle=idle)
            else:
                self._record("leak", "abandoned", started, status=0, idle=idle)
        except OSError as e:
            self._record("leak", "error", started, status=0, idle=idle, error=type(e).__name__)

    def wait_ready(self) -> bool:
        deadline = time.monotonic() + self.ready_timeout
        while not self.stop.is_set() and time.monotonic() < deadline:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
            try:
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return True
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            self.stop.wait(0.25)
        return False

    def lane(self, end: float) -> None:
        while not self.stop.is_set() and time.monotonic() < end:
            self.wait_quiet()
            self.request("lane")
            self.stop.wait(min(self.rng.uniform(*self.gap), max(0.0, end - time.monotonic())))

    def open_loop(self, rate: float, end: float, send: str) -> None:
        """Start one request every ``1/rate`` seconds, each in its own thread."""
        target = self.abandon if send == "leak" else lambda: self.request("rate")
        next_at = time.monotonic()
        while not self.stop.is_set() and next_at < end:
            if send != "leak":
                self.wait_quiet()
                next_at = max(next_at, time.monotonic())  # no catching up after a quiet period
            threading.Thread(target=target, daemon=True).start()
            next_at += 1.0 / rate
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def bursts(self, end: float) -> None:
        """Every drawn gap, a few requests at once, each in its own thread."""
        low, high = self.burst_size
        while not self.stop.is_set() and time.monotonic() < end:
            self.wait_quiet()
            for _ in range(self.rng.randint(min(low, high), high)):
                threading.Thread(target=self.request, args=("burst",), daemon=True).start()
            self.stop.wait(
                min(self.rng.uniform(*self.burst_every), max(0.0, end - time.monotonic()))
            )

    def run(self) -> None:
        if not allowed_target(self.host):
            sys.exit(f"refusing to drive {self.host}: only loopback and the sandbox's pod network")
        log("started", **self.settings())
        if not self.wait_ready():
            log("target_unready", seconds=self.ready_timeout)
        else:
            log("target_ready")
            self.started = time.monotonic()
            end = self.started + self.seconds
            workers = [
                threading.Thread(target=self.lane, args=(end,), daemon=True)
                for _ in range(self.lanes)
            ]
            if self.rate > 0:
                workers.append(
                    threading.Thread(
                        target=self.open_loop, args=(self.rate, end, "rate"), daemon=True
                    )
                )
            if self.burst_size[1] > 0:
                workers.append(threading.Thread(target=self.bursts, args=(end,), daemon=True))
            if self.leak_rate > 0:
                workers.append(
                    threading.Thread(
                        target=self.open_loop, args=(self.leak_rate, end, "leak"), daemon=True
                    )
                )
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            # Let requests still under way answer (at most one timeout).
            self.stop.wait(min(self.timeout, self.inflight_idle[1] + 1.0))
            with self.lock:
                log("done", **{k: self.totals[k] for k in sorted(self.totals)})
        self.stop.wait()
        log("stopped")


def main() -> None:
    Driver().run()


if __name__ == "__main__":
    main()
