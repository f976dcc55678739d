"""Actions the plan may ask for: a tagged union of frozen dataclasses.

Pure data; ``connbudget.cycle`` carries them out through the Kubernetes and PostgreSQL layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from connbudget.model.spec import ObjectRef, RestartMethod


@dataclass(frozen=True, kw_only=True)
class IdleBackend:
    """A backend chosen for termination, as the probe saw it.

    ``pid`` and ``backend_start`` say which backend it is (a pid is reused); ``state_change`` is
    when it last changed state (epoch seconds, the server's clock): a backend whose state changed
    after that was used again since the probe and is left alone.
    """

    pid: int
    pod: str
    idle_seconds: float
    backend_start: float
    state_change: float


@dataclass(frozen=True, kw_only=True)
class Termination:
    """What terminating backends did: the pids terminated, and the pids left alone because the
    monitoring role may not signal them (a superuser's backend, or another role's without
    ``pg_signal_backend``). A chosen backend in neither was used again, or had gone."""

    terminated: tuple[int, ...] = ()
    not_permitted: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class TerminateBackends:
    """``pg_terminate_backend`` each of ``backends`` (all idle, all of governed pods)."""

    backends: tuple[IdleBackend, ...]

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(sorted({b.pod for b in self.backends}))


@dataclass(frozen=True, kw_only=True)
class RestartPod:
    """Restart one governed pod: evict or delete it, or rollout-restart its owner."""

    namespace: str
    pod: str
    uid: str
    method: RestartMethod
    owner_kind: str
    owner_name: str

    @property
    def targets(self) -> tuple[str, ...]:
        if self.method is RestartMethod.ROLLOUT_RESTART:
            return (f"{self.owner_kind}/{self.owner_name}",)
        return (f"pod/{self.pod}",)


@dataclass(frozen=True, kw_only=True)
class ScalePooler:
    """Set the pooler's ``/scale`` replicas."""

    target: ObjectRef
    current: int
    desired: int

    @property
    def targets(self) -> tuple[str, ...]:
        return (f"{self.target.kind}/{self.target.name}",)


Action = TerminateBackends | RestartPod | ScalePooler
