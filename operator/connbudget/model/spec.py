"""ConnectionBudget spec, parsed into typed values, and the operator's own checks of it.

Pure: no I/O, no clock; all inputs are arguments. The API server has already applied the CRD's
schema, defaults and CEL rules to what reaches the operator; ``parse_spec`` still checks what it
relies on, because ``connbudget check`` runs it on manifests the API server has not seen.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

GROUP = "connbudget.io"
VERSION = "v1alpha1"
PLURAL = "connectionbudgets"
KIND = "ConnectionBudget"
PAUSED_ANNOTATION = "connbudget.io/paused"

# What the API server accepts as a Secret's name (a DNS-1123 subdomain) and as a key of its data;
# the CRD's schema has the same patterns, so ``connbudget check`` and the API server agree.
SECRET_NAME_PATTERN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
SECRET_KEY_PATTERN = r"[-._a-zA-Z0-9]+"
SECRET_NAME_MAX_LENGTH = SECRET_KEY_MAX_LENGTH = 253


class SpecError(ValueError):
    """The spec cannot be used; ``problems`` lists each reason with its field path."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class Scope(enum.StrEnum):
    DATABASE = "Database"
    SERVER = "Server"
    SELECTED = "Selected"


class AttributionMode(enum.StrEnum):
    AUTO = "Auto"
    CLIENT_ADDR = "ClientAddr"
    APPLICATION_NAME = "ApplicationName"


class Step(enum.StrEnum):
    TERMINATE_IDLE = "TerminateIdle"
    RESTART_PODS = "RestartPods"
    SCALE_POOLER = "ScalePooler"


class RestartMethod(enum.StrEnum):
    EVICT = "Evict"
    ROLLOUT_RESTART = "RolloutRestart"
    DELETE = "Delete"


class AdmissionMode(enum.StrEnum):
    """What a workload change whose worst case breaks the budget gets (policy.admission)."""

    OFF = "Off"  # not checked
    WARN = "Warn"  # admitted, with a warning and an Event
    DENY = "Deny"  # refused, the message giving the arithmetic


@dataclass(frozen=True, kw_only=True)
class SecretRef:
    name: str
    key: str = "dsn"
    ca_key: str | None = None  # the key of a PEM CA bundle in the same Secret (database only)


@dataclass(frozen=True, kw_only=True)
class LabelRequirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class LabelSelector:
    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: tuple[LabelRequirement, ...] = ()

    def key(self) -> tuple[tuple[tuple[str, str], ...], tuple[LabelRequirement, ...]]:
        """A hashable value equal for selectors that select the same (a cache key)."""
        return tuple(sorted(self.match_labels.items())), self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Tell whether ``labels`` satisfy every label and every requirement of this selector."""
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "In" and (not present or labels[req.key] not in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True

    def to_query(self) -> str:
        """Render as a ``labelSelector`` query string for the Kubernetes API."""
        parts = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        for req in self.match_expressions:
            if req.operator == "Exists":
                parts.append(req.key)
            elif req.operator == "DoesNotExist":
                parts.append(f"!{req.key}")
            else:
                op = "in" if req.operator == "In" else "notin"
                parts.append(f"{req.key} {op} ({','.join(req.values)})")
        return ",".join(parts)


@dataclass(frozen=True, kw_only=True)
class ObjectRef:
    api_version: str
    kind: str
    name: str


@dataclass(frozen=True, kw_only=True)
class BudgetLimit:
    max_connections: int | None
    max_percent: int | None
    scope: Scope
    warning_percent: int

    def resolve(self, *, server_max_connections: int, reserved: int) -> int:
        """The budget in connections, given the server's limits."""
        if self.max_connections is not None:
            return self.max_connections
        usable = max(server_max_connections - reserved, 0)
        return max(usable * (self.max_percent or 0) // 100, 1)


@dataclass(frozen=True, kw_only=True)
class TerminateIdleSpec:
    max_per_cycle: int = 100
    min_idle_seconds: int = 3


@dataclass(frozen=True, kw_only=True)
class RestartPodsSpec:
    method: RestartMethod = RestartMethod.EVICT
    max_pods_per_cycle: int = 1
    min_pod_age_seconds: int = 120


@dataclass(frozen=True, kw_only=True)
class RemediationSpec:
    dry_run: bool = False
    breach_seconds: int = 15
    cooldown_seconds: int = 60
    steps: tuple[Step, ...] = (Step.TERMINATE_IDLE, Step.RESTART_PODS, Step.SCALE_POOLER)
    terminate_idle: TerminateIdleSpec = TerminateIdleSpec()
    restart_pods: RestartPodsSpec = RestartPodsSpec()


@dataclass(frozen=True, kw_only=True)
class PoolerSpec:
    target_ref: ObjectRef
    min_replicas: int = 1
    max_replicas: int = 4
    server_connections_per_replica: int = 20
    admin_secret_ref: SecretRef | None = None
    pod_labels: Mapping[str, str] | None = None


@dataclass(frozen=True, kw_only=True)
class BudgetSpec:
    database_secret: SecretRef
    budget: BudgetLimit
    selector: LabelSelector
    attribution: AttributionMode = AttributionMode.AUTO
    leak_idle_seconds: int = 300
    remediation: RemediationSpec = RemediationSpec()
    pooler: PoolerSpec | None = None
    poll_seconds: int = 5
    admission: AdmissionMode = AdmissionMode.WARN


def _present(data: Mapping[str, object], key: str, default: object) -> object:
    """The value at ``key``; a null counts as absent, as the API server prunes it."""
    value = data.get(key)
    return default if value is None else value


class _Reader:
    """Reads typed values out of a JSON-like mapping, collecting problems with their paths."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def obj(self, data: object, path: str, *, required: bool = False) -> Mapping[str, object]:
        if data is None:
            if required:
                self.problems.append(f"{path} is required")
            return {}
        if not isinstance(data, Mapping):
            self.problems.append(f"{path} must be an object")
            return {}
        return cast(Mapping[str, object], data)

    def string(
        self,
        data: Mapping[str, object],
        key: str,
        path: str,
        *,
        default: str | None = None,
        choices: type[enum.StrEnum] | None = None,
    ) -> str:
        value = _present(data, key, default)
        if value is None:
            self.problems.append(f"{path}.{key} is required")
            return ""
        if not isinstance(value, str) or not value:
            self.problems.append(f"{path}.{key} must be a non-empty string")
            return default or ""
        if choices is not None and value not in {c.value for c in choices}:
            allowed = ", ".join(c.value for c in choices)
            self.problems.append(f"{path}.{key} must be one of {allowed}, not {value!r}")
            return default or ""
        return value

    def integer(
        self,
        data: Mapping[str, object],
        key: str,
        path: str,
        *,
        default: int | None,
        low: int,
        high: int,
    ) -> int | None:
        value = _present(data, key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems.append(f"{path}.{key} must be an integer")
            return default
        if not low <= value <= high:
            self.problems.append(f"{path}.{key} must be between {low} and {high}, not {value}")
            return default
        return value

    def need_int(
        self, data: Mapping[str, object], key: str, path: str, *, default: int, low: int, high: int
    ) -> int:
        value = self.integer(data, key, path, default=default, low=low, high=high)
        return default if value is None else value

    def boolean(self, data: Mapping[str, object], key: str, path: str, *, default: bool) -> bool:
        value = _present(data, key, default)
        if not isinstance(value, bool):
            self.problems.append(f"{path}.{key} must be true or false")
            return default
        return value

    def secret_ref(self, data: object, path: str, *, required: bool) -> SecretRef | None:
        ref = self.obj(data, path, required=required)
        if not ref:
            return None
        ca_key = _present(ref, "caKey", None)
        if ca_key is not None and (not isinstance(ca_key, str) or not ca_key):
            self.problems.append(f"{path}.caKey must be a non-empty string")
            ca_key = None
        name = self.string(ref, "name", path)
        if name and not _matches(SECRET_NAME_PATTERN, name, SECRET_NAME_MAX_LENGTH):
            self.problems.append(
                f"{path}.name must be a Secret name (a DNS subdomain: lower-case letters, digits,"
                f" '-' and '.', starting and ending with a letter or digit, at most"
                f" {SECRET_NAME_MAX_LENGTH} characters), not {name!r}"
            )
        key = self.string(ref, "key", path, default="dsn")
        for field_name, value in (("key", key), ("caKey", ca_key)):
            if value and not _matches(SECRET_KEY_PATTERN, value, SECRET_KEY_MAX_LENGTH):
                self.problems.append(
                    f"{path}.{field_name} must be a Secret data key (letters, digits, '-', '_'"
                    f" and '.', at most {SECRET_KEY_MAX_LENGTH} characters), not {value!r}"
                )
        return SecretRef(name=name, key=key, ca_key=ca_key)


def _matches(pattern: str, value: str, max_length: int) -> bool:
    return len(value) <= max_length and re.fullmatch(pattern, value) is not None


def _parse_selector(r: _Reader, data: object) -> LabelSelector:
    sel = r.obj(data, "spec.selector", required=True)
    labels_raw = r.obj(sel.get("matchLabels"), "spec.selector.matchLabels")
    labels: dict[str, str] = {}
    for k, v in labels_raw.items():
        if not isinstance(v, str):
            r.problems.append(f"spec.selector.matchLabels.{k} must be a string")
        else:
            labels[k] = v
    exprs: list[LabelRequirement] = []
    raw_exprs = sel.get("matchExpressions") or []
    if not isinstance(raw_exprs, list):
        r.problems.append("spec.selector.matchExpressions must be a list")
        raw_exprs = []
    for i, raw in enumerate(raw_exprs):
        path = f"spec.selector.matchExpressions[{i}]"
        e = r.obj(raw, path)
        key = r.string(e, "key", path)
        op = r.string(e, "operator", path)
        values = e.get("values") or []
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            r.problems.append(f"{path}.operator must be In, NotIn, Exists or DoesNotExist")
        elif not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            r.problems.append(f"{path}.values must be a list of strings")
        elif (op in ("In", "NotIn")) != bool(values):
            r.problems.append(
                f"{path}: In and NotIn need values; Exists and DoesNotExist take none"
            )
        else:
            exprs.append(LabelRequirement(key=key, operator=op, values=tuple(values)))
    if (
        data is not None
        and not labels
        and not exprs
        and not any("spec.selector" in p for p in r.problems)
    ):
        r.problems.append(
            "spec.selector must not be empty: an empty selector would govern every "
            "pod in the namespace"
        )
    return LabelSelector(match_labels=labels, match_expressions=tuple(exprs))


def parse_spec(spec: Mapping[str, object]) -> BudgetSpec:
    """Parse a ConnectionBudget ``spec`` (with or without the CRD's defaults applied).

    Raises:
        SpecError: listing every problem found, each with its field path.
    """
    r = _Reader()
    db = r.obj(spec.get("database"), "spec.database", required=True)
    secret = r.secret_ref(db.get("secretRef"), "spec.database.secretRef", required=True)

    b = r.obj(spec.get("budget"), "spec.budget", required=True)
    max_conn = r.integer(b, "maxConnections", "spec.budget", default=None, low=1, high=1_000_000)
    max_pct = r.integer(b, "maxPercent", "spec.budget", default=None, low=1, high=100)
    if spec.get("budget") is not None and (max_conn is None) == (max_pct is None):
        r.problems.append("spec.budget: give exactly one of maxConnections and maxPercent")
    limit = BudgetLimit(
        max_connections=max_conn,
        max_percent=max_pct,
        scope=Scope(r.string(b, "scope", "spec.budget", default="Database", choices=Scope)),
        warning_percent=r.need_int(b, "warningPercent", "spec.budget", default=80, low=1, high=100),
    )
    selector = _parse_selector(r, spec.get("selector"))
    attr = r.obj(spec.get("attribution"), "spec.attribution")
    mode = AttributionMode(
        r.string(attr, "mode", "spec.attribution", default="Auto", choices=AttributionMode)
    )
    leak = r.obj(spec.get("leakDetection"), "spec.leakDetection")
    idle_seconds = r.need_int(
        leak, "idleSeconds", "spec.leakDetection", default=300, low=1, high=604_800
    )

    rem = r.obj(spec.get("remediation"), "spec.remediation")
    raw_steps = rem.get("steps", [s.value for s in Step])
    steps: list[Step] = []
    if not isinstance(raw_steps, list) or not raw_steps:
        r.problems.append("spec.remediation.steps must be a non-empty list")
    else:
        for i, s in enumerate(raw_steps):
            if s not in {x.value for x in Step}:
                r.problems.append(
                    f"spec.remediation.steps[{i}] must be one of "
                    f"{', '.join(x.value for x in Step)}, not {s!r}"
                )
            elif Step(s) in steps:
                r.problems.append(f"spec.remediation.steps[{i}]: {s} is listed twice")
            else:
                steps.append(Step(s))
    ti = r.obj(rem.get("terminateIdle"), "spec.remediation.terminateIdle")
    rp = r.obj(rem.get("restartPods"), "spec.remediation.restartPods")
    terminate = TerminateIdleSpec(
        max_per_cycle=r.need_int(
            ti, "maxPerCycle", "spec.remediation.terminateIdle", default=100, low=1, high=10_000
        ),
        min_idle_seconds=r.need_int(
            ti, "minIdleSeconds", "spec.remediation.terminateIdle", default=3, low=1, high=604_800
        ),
    )
    if terminate.min_idle_seconds > idle_seconds:
        r.problems.append(
            "spec.remediation.terminateIdle.minIdleSeconds must not exceed "
            "spec.leakDetection.idleSeconds"
        )
    remediation = RemediationSpec(
        dry_run=r.boolean(rem, "dryRun", "spec.remediation", default=False),
        breach_seconds=r.need_int(
            rem, "breachSeconds", "spec.remediation", default=15, low=0, high=3600
        ),
        cooldown_seconds=r.need_int(
            rem, "cooldownSeconds", "spec.remediation", default=60, low=0, high=86_400
        ),
        steps=tuple(steps),
        terminate_idle=terminate,
        restart_pods=RestartPodsSpec(
            method=RestartMethod(
                r.string(
                    rp,
                    "method",
                    "spec.remediation.restartPods",
                    default="Evict",
                    choices=RestartMethod,
                )
            ),
            max_pods_per_cycle=r.need_int(
                rp, "maxPodsPerCycle", "spec.remediation.restartPods", default=1, low=1, high=100
            ),
            min_pod_age_seconds=r.need_int(
                rp,
                "minPodAgeSeconds",
                "spec.remediation.restartPods",
                default=120,
                low=0,
                high=86_400,
            ),
        ),
    )

    pooler: PoolerSpec | None = None
    if spec.get("pooler") is not None:
        p = r.obj(spec.get("pooler"), "spec.pooler")
        t = r.obj(p.get("targetRef"), "spec.pooler.targetRef", required=True)
        target = ObjectRef(
            api_version=r.string(t, "apiVersion", "spec.pooler.targetRef"),
            kind=r.string(t, "kind", "spec.pooler.targetRef"),
            name=r.string(t, "name", "spec.pooler.targetRef"),
        )
        low = r.need_int(p, "minReplicas", "spec.pooler", default=1, low=0, high=10_000)
        high = r.need_int(p, "maxReplicas", "spec.pooler", default=4, low=1, high=10_000)
        if low > high:
            r.problems.append("spec.pooler.minReplicas must not exceed spec.pooler.maxReplicas")
        raw_labels = r.obj(p.get("selector"), "spec.pooler.selector")
        pooler = PoolerSpec(
            target_ref=target,
            min_replicas=low,
            max_replicas=high,
            server_connections_per_replica=r.need_int(
                p, "serverConnectionsPerReplica", "spec.pooler", default=20, low=1, high=100_000
            ),
            admin_secret_ref=r.secret_ref(
                p.get("adminSecretRef"), "spec.pooler.adminSecretRef", required=False
            ),
            pod_labels={k: str(v) for k, v in raw_labels.items()} or None,
        )
    poll = r.need_int(spec, "pollSeconds", "spec", default=5, low=1, high=3600)
    adm = r.obj(spec.get("admission"), "spec.admission")
    admission = AdmissionMode(
        r.string(adm, "mode", "spec.admission", default="Warn", choices=AdmissionMode)
    )
    if r.problems or secret is None:
        raise SpecError(r.problems or ["spec.database.secretRef is required"])
    return BudgetSpec(
        database_secret=secret,
        budget=limit,
        selector=selector,
        attribution=mode,
        leak_idle_seconds=idle_seconds,
        remediation=remediation,
        pooler=pooler,
        poll_seconds=poll,
        admission=admission,
    )


def is_paused(annotations: Mapping[str, str] | None) -> bool:
    """Tell whether the ``connbudget.io/paused`` annotation pauses actions."""
    return (annotations or {}).get(PAUSED_ANNOTATION, "").strip().lower() == "true"
