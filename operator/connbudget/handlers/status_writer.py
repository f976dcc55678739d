"""Writing budgets' statuses: when, and on the condition that nobody changed the budget since.

- **When.** A status that would change only in ``lastProbeTime`` is written at most once a
  heartbeat (``STATUS_HEARTBEAT_SECONDS``): each write costs the API server a PATCH and every
  watcher an event. A heartbeat also waits while the client's token bucket is below half
  (``kube.flow``): statuses that changed go first.
- **Optimistic concurrency.** A write names the resourceVersion the watch delivered last; a
  conflict means someone else (another replica, a person) changed the budget: the budget is read
  again and the decision made anew (``StatusConflict``), unless only the version was stale (the
  watch delivered an older echo of this replica's own write).
- **What this replica wrote** is kept (``written``), ahead of the watch: the next cycle decides
  from it. It is forgotten when another replica takes the budget over.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from connbudget.kube.api import Kube, KubeError
from connbudget.report import status

Key = tuple[str, str]  # (namespace, name)
# A status that would change only in lastProbeTime is written at most this often (a heartbeat:
# lastProbeTime is never older than this while probing works).
STATUS_HEARTBEAT_SECONDS = 60.0


class StatusConflict(Exception):
    """Another writer changed the budget since this replica read it: decide again."""


class Versioned(Protocol):
    """A budget as the watch delivered it: its status and resourceVersion (updated here)."""

    status: dict[str, Any]
    resource_version: str


class StatusWriter:
    def __init__(
        self,
        kube: Kube,
        budgets: Mapping[Key, Versioned],
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube = kube
        self.budgets = budgets  # the reconciler's, as the watch keeps them
        self.monotonic = monotonic
        self.written: dict[Key, dict[str, Any]] = {}  # the status we wrote last (ahead of watch)
        self.written_at: dict[Key, float] = {}  # when (monotonic) this process last wrote it

    def current(self, key: Key) -> dict[str, Any]:
        """The status decisions start from: what this replica wrote, else what the watch has."""
        written = self.written.get(key)
        if written is not None:
            return written
        b = self.budgets.get(key)
        return b.status if b is not None else {}

    def due(self, key: Key, old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
        """Whether to write ``new`` over ``old`` now (see the module docstring)."""
        last = self.written_at.get(key)
        since = None if last is None else self.monotonic() - last
        if not status.worth_writing(
            old, new, seconds_since_write=since, heartbeat=STATUS_HEARTBEAT_SECONDS
        ):
            return False  # only the probe time would move
        # Only the heartbeat is due: it waits for a quiet moment of the client's token bucket.
        return since is None or self.kube.spare() or status.changes_more_than_probe_time(old, new)

    def forget(self, key: Key) -> None:
        """Forget what was written (another replica writes now, or the budget is gone); the next
        status of this replica is written whatever it says."""
        self.written.pop(key, None)
        self.written_at.pop(key, None)

    def rewrite_soon(self, key: Key) -> None:
        """Write the next status even if only its probe time moved (the API server is back, the
        spec changed: whoever looks next sees a fresh lastProbeTime)."""
        self.written_at.pop(key, None)

    async def write(self, key: Key, old: dict[str, Any], new: dict[str, Any]) -> None:
        """Write a status, on the condition that nobody changed the budget since it was read.

        Raises ``StatusConflict`` (after reading the budget again) when someone did: what was
        decided rests on a stale status, so it is neither written nor acted on. A conflict with
        nothing changed but the version (the watch delivered an older echo of this replica's own
        write) is written again at once.
        """
        for attempt in range(2):
            b = self.budgets.get(key)
            try:
                version = await self.kube.patch_budget_status(
                    key[0], key[1], new, resource_version=b.resource_version if b else None
                )
            except KubeError as e:
                if e.status == 404:
                    return  # deleted meanwhile; the watch will tell
                if e.status != 409:
                    raise
                mine = self.written.get(key)
                fresh = await self._reread(key)
                if attempt == 0 and mine is not None and fresh == mine:
                    continue  # only the version was stale: the status is what this replica wrote
                raise StatusConflict(f"{key[0]}/{key[1]} changed meanwhile") from None
            if b is not None and version:
                b.resource_version = version
            merged = {**old, **new}
            self.written[key] = {k: v for k, v in merged.items() if v is not None}
            self.written_at[key] = self.monotonic()
            return

    async def _reread(self, key: Key) -> dict[str, Any]:
        """Take the budget as the API server has it now, and forget what this replica wrote;
        return its status."""
        self.forget(key)
        body = await self.kube.read_budget(*key)
        meta = body.get("metadata") or {}
        fresh_status = dict(body.get("status") or {})
        old = self.budgets.get(key)
        if old is not None:
            old.status = fresh_status
            old.resource_version = str(meta.get("resourceVersion") or "")
        return fresh_status
