"""Client-side flow control for calls to the Kubernetes API, as client-go's QPS and burst.

Every budget writes its status, posts Events and reads Secrets through one client; with thousands
of budgets their first writes alone would arrive at once, and each write is a watch event for every
replica. A token bucket spreads them: ``burst`` calls may go at once, then ``qps`` a second. Calls
wait their turn in order. Work that can wait for a quiet moment (a status whose only change is its
heartbeat) asks ``spare`` first and is left for a later cycle while the bucket is below half.

Leader election does not pass through the bucket (``Kube.call_lease``): as controller-runtime gives
leader election its own client, a renewal never queues behind status writes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

DEFAULT_QPS = 50.0
DEFAULT_BURST = 100
_EPSILON = 1e-9


class TokenBucket:
    """``burst`` tokens, refilled at ``qps`` a second; ``qps`` 0 means no limit."""

    def __init__(
        self,
        qps: float = DEFAULT_QPS,
        burst: int = DEFAULT_BURST,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if qps < 0 or burst < 1:
            raise ValueError(f"a token bucket needs qps >= 0 and burst >= 1, not {qps}/{burst}")
        self.qps = qps
        self.burst = burst
        self.clock = clock
        self.sleep = sleep
        self._tokens = float(burst)
        self._at = clock()
        self._turn = asyncio.Lock()  # waiters take tokens in the order they came
        self.waited = 0.0  # seconds spent waiting for tokens, in total (a metric)

    def tokens(self) -> float:
        """The tokens there are now."""
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.qps)
        self._at = now
        return self._tokens

    def try_take(self) -> bool:
        """Take a token if there is one now."""
        if self.qps == 0:
            return True
        if self.tokens() >= 1.0 - _EPSILON:  # a wait of exactly one token's time gives one
            self._tokens = max(0.0, self._tokens - 1.0)
            return True
        return False

    def spare(self) -> bool:
        """Whether the bucket is at least half full: deferrable work may go now."""
        return self.qps == 0 or self.tokens() >= self.burst / 2

    async def take(self) -> None:
        """Wait for a token, after every caller that came before."""
        if self.qps == 0:
            return
        async with self._turn:
            while not self.try_take():
                pause = (1.0 - self._tokens) / self.qps
                self.waited += pause
                await self.sleep(pause)
