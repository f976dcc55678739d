"""The ``connbudget`` command: run the operator, probe a database, check manifests, show leaks.

connbudget run [--namespace NS ... | --all-namespaces] [--metrics-port N] [--log-format json|text]
               (each also from CONNBUDGET_*: see connbudget.config)
connbudget probe [--dsn-file FILE] [--pgbouncer-dsn-file FILE] [--json]   (or $CONNBUDGET_DSN, ...)
connbudget check [--strict] FILE|DIR...
connbudget leaks [-n NAMESPACE | -A] [--all-owners] [--json] [--kubeconfig FILE] [--context NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, cast

import yaml

from connbudget import __version__, leaks
from connbudget.config import (
    DEFAULT_LIVENESS,
    DEFAULT_METRICS_PORT,
    ENV_KUBE_BURST,
    ENV_KUBE_QPS,
    ENV_LIVENESS,
    ENV_LOG_FORMAT,
    ENV_METRICS_PORT,
    ENV_NAMESPACES,
    ENV_SHARDS,
    ENV_STANDALONE,
    LOG_FORMATS,
    MAX_SHARDS,
    ConfigError,
    OperatorConfig,
)
from connbudget.kube.flow import DEFAULT_BURST, DEFAULT_QPS
from connbudget.model.observations import (
    PROBE_APPLICATION_NAME,
    BackendGroup,
    LastStatement,
    PoolerSample,
    ServerSample,
)
from connbudget.model.schema import validate
from connbudget.model.spec import GROUP, KIND, VERSION, AdmissionMode, SpecError, parse_spec
from connbudget.policy import admission, fingerprint
from connbudget.probe.errors import ProbeError

CRD_RESOURCE = "connectionbudgets.connbudget.io.yaml"
EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A command line that cannot be acted on; the message says why (and never holds a DSN)."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    _standard = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(
            {
                k: v
                for k, v in record.__dict__.items()
                if k not in self._standard and not k.startswith("_")
            }
        )
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(fmt: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def run_config(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> OperatorConfig:
    """The operator's settings: ``CONNBUDGET_*`` from the environment, each flag given over it."""
    if args.namespace and args.all_namespaces:
        raise UsageError("give --namespace or --all-namespaces, not both")
    config = OperatorConfig.from_env(environ)
    given: dict[str, Any] = {}
    if args.namespace:
        given["namespaces"] = tuple(args.namespace)
    elif args.all_namespaces:
        given["namespaces"] = ()  # every namespace, whatever CONNBUDGET_NAMESPACES says
    if args.metrics_port is not None:
        given["metrics_port"] = args.metrics_port
    if args.liveness is not None:
        given["liveness"] = args.liveness or None
    if args.log_format is not None:
        given["log_format"] = args.log_format
    if args.kubeconfig:
        given["kubeconfig"] = args.kubeconfig
    if args.standalone:
        given["standalone"] = True
    if args.shards is not None:
        given["shards"] = args.shards
    if args.kube_qps is not None:
        given["kube_qps"] = args.kube_qps
    if args.kube_burst is not None:
        given["kube_burst"] = args.kube_burst
    return dataclasses.replace(config, **given)


def cmd_run(args: argparse.Namespace) -> int:
    from connbudget.handlers import lifecycle

    try:
        config = run_config(args)
    except (UsageError, ConfigError) as e:
        print(f"connbudget run: {e}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(config.log_format)
    if config.kubeconfig:
        os.environ["KUBECONFIG"] = config.kubeconfig
    logging.getLogger("connbudget").info(
        "starting",
        extra={
            "version": __version__,
            "namespaces": list(config.namespaces) or "all",
            "standalone": config.standalone,
            "shards": config.shards,
        },
    )
    lifecycle.run_operator(config)
    return EXIT_OK


# --- probe ------------------------------------------------------------------------------------


# The states whose backends wait on their client: what each last ran is where the code left it
# (an active backend's statement is still running, and says nothing of a leak).
STATEMENT_STATES = ("idle", "idle in transaction", "idle in transaction (aborted)")
# Seconds two backend_start readings may differ by and be one backend (as probe.queries does).
START_EPSILON = 0.001


def probe_report(
    sample: ServerSample,
    pooler: PoolerSample | None,
    *,
    statements: Sequence[LastStatement] = (),
) -> dict[str, Any]:
    """The JSON document ``connbudget probe --json`` prints.

    ``statements`` are the last statements of the waiting backends (``STATEMENT_STATES``); each
    such group lists its ``fingerprint.TOP_STATEMENTS`` most frequent shapes, normalised by
    ``policy.fingerprint`` so that no literal of them is ever printed. ``statementsVisible`` is
    False when the probe's role could not read some of them (no pg_read_all_stats).
    """
    groups = [g for g in sample.groups if g.application_name != PROBE_APPLICATION_NAME]
    by_pid = {s.pid: s for s in statements}

    def shapes(g: BackendGroup) -> list[dict[str, Any]]:
        if g.state not in STATEMENT_STATES:
            return []
        # A backend is known by pid and start time: a pid reused since the sample is another.
        found = [
            s
            for pid, _, start in g.backends
            if (s := by_pid.get(pid)) is not None and abs(s.backend_start - start) < START_EPSILON
        ]
        ranked = fingerprint.rank_statements(
            fingerprint.statement_of(s.query, s.query_id) for s in found
        )
        return [
            {
                "fingerprint": st.fingerprint,
                "statement": st.text,
                "tags": dict(st.tags),
                "count": n,
            }
            for st, n in ranked
        ]

    out: dict[str, Any] = {
        "connections": sum(g.count for g in groups),
        "maxConnections": sample.max_connections,
        "reserved": sample.reserved,
        "database": sample.database,
        "groups": [
            {
                "applicationName": g.application_name,
                "clientAddr": g.client_addr,
                "user": g.user,
                "database": g.database,
                "state": g.state,
                "count": g.count,
                "maxIdleSeconds": round(g.max_idle_seconds, 1),
                "statements": shapes(g),
            }
            for g in sorted(
                groups,
                key=lambda g: (-g.count, g.application_name, g.client_addr or "", g.state or ""),
            )
        ],
        "statementsVisible": not any(s.query.strip() == fingerprint.HIDDEN for s in statements),
    }
    if pooler is not None:
        out["pgbouncer"] = {
            "clients": len(pooler.clients),
            "clientsWaiting": pooler.clients_waiting,
            "serverConnections": pooler.server_connections,
            "errors": list(pooler.errors),
            "clientsByAddr": _count_by(c.addr or "" for c in pooler.clients),
        }
    return out


def _count_by(values: Iterator[str] | Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# "12 times" before a statement: how many of the group's backends last ran it.
TIMES = "\N{MULTIPLICATION SIGN}"
# Shown when some statements read "<insufficient privilege>": what the probe's role lacks.
HIDDEN_STATEMENTS_HINT = (
    "Some statements are hidden: the probe's role cannot read other roles' queries."
    " Grant it pg_read_all_stats (e.g. GRANT pg_monitor TO <role>) to see them."
)


def render_probe_table(report: Mapping[str, Any]) -> str:
    """The ``connbudget probe`` table: one row per group, its last statements indented below."""
    lines = [
        f"{report['connections']} client connections on a server with max_connections "
        f"{report['maxConnections']} ({report['reserved']} reserved)",
        "",
    ]
    header = ("APPLICATION", "CLIENT", "USER", "DATABASE", "STATE", "COUNT", "MAX IDLE")
    rows = [header] + [
        (
            g["applicationName"] or "-",
            g["clientAddr"] or "local",
            g["user"] or "-",
            g["database"] or "-",
            g["state"] or "-",
            str(g["count"]),
            f"{g['maxIdleSeconds']:.0f}s" if g["state"] == "idle" else "",
        )
        for g in report["groups"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    # Groups of old reports (or of tests) may have no statements: those show none.
    below: list[list[dict[str, Any]]] = [[]] + [g.get("statements", []) for g in report["groups"]]
    for row, shapes in zip(rows, below, strict=True):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        for shape in shapes:
            tags = " ".join(f"{k}={v}" for k, v in shape["tags"].items())
            lines.append(
                f"    {shape['count']}{TIMES} {shape['statement']}" + (f"  {tags}" if tags else "")
            )
    if not report.get("statementsVisible", True):
        lines += ["", HIDDEN_STATEMENTS_HINT]
    if "pgbouncer" in report:
        p = report["pgbouncer"]
        lines += [
            "",
            f"PgBouncer: {p['clients']} clients ({p['clientsWaiting']} waiting), "
            f"{p['serverConnections']} server connections",
        ]
        lines += [f"  {addr or '-'}: {n}" for addr, n in p["clientsByAddr"].items()]
        lines += [f"  error: {e}" for e in p["errors"]]
    return "\n".join(lines)


async def _probe(dsn: str, pgbouncer: str | None) -> dict[str, Any]:
    from connbudget.probe.pgbouncer import host_of, sample_poolers
    from connbudget.probe.postgres import Monitor

    monitor = Monitor(dsn)
    try:
        sample = await monitor.sample()
        statements = await monitor.statements(
            (pid, start)
            for g in sample.groups
            if g.application_name != PROBE_APPLICATION_NAME and g.state in STATEMENT_STATES
            for pid, _, start in g.backends
        )
    finally:
        await monitor.close()
    pooler = None
    if pgbouncer:
        pooler = await sample_poolers(pgbouncer, [host_of(pgbouncer)], replicas=1)
    return probe_report(sample, pooler, statements=statements)


# Where ``connbudget probe`` finds its DSNs when none is given on the command line: a DSN in an
# argument is visible to every user of the machine (``ps``, /proc/PID/cmdline), the environment
# and a file are not.
DSN_ENV = "CONNBUDGET_DSN"
PGBOUNCER_DSN_ENV = "CONNBUDGET_PGBOUNCER_DSN"


def _read_dsn_file(path: str, option: str) -> str:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        # The error names the file, never its content.
        raise UsageError(f"cannot read {option} {path}: {type(e).__name__}") from None
    dsn = text.strip()
    if not dsn:
        raise UsageError(f"{option} {path} is empty")
    return dsn


def resolve_dsn(
    given: str | None,
    path: str | None,
    env_name: str,
    environ: Mapping[str, str],
    *,
    option: str,
    argument: str,
) -> str | None:
    """The DSN from the command line, else from its file, else from the environment (or None)."""
    if given is not None and path is not None:
        raise UsageError(f"give {argument} or {option}, not both")
    if path is not None:
        return _read_dsn_file(path, option)
    if given is not None:
        return given
    return environ.get(env_name) or None


def probe_dsns(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> tuple[str, str | None]:
    """The database DSN and the PgBouncer admin DSN ``connbudget probe`` should use."""
    environ = os.environ if environ is None else environ
    if args.dsn_file == "-" and args.pgbouncer_dsn_file == "-":
        raise UsageError("only one of --dsn-file and --pgbouncer-dsn-file can be - (stdin)")
    dsn = resolve_dsn(
        args.dsn, args.dsn_file, DSN_ENV, environ, option="--dsn-file", argument="DSN"
    )
    if dsn is None:
        raise UsageError(f"no DSN: give --dsn-file FILE, set {DSN_ENV}, or give it as DSN")
    pgbouncer = resolve_dsn(
        args.pgbouncer,
        args.pgbouncer_dsn_file,
        PGBOUNCER_DSN_ENV,
        environ,
        option="--pgbouncer-dsn-file",
        argument="--pgbouncer",
    )
    return dsn, pgbouncer


def cmd_probe(args: argparse.Namespace) -> int:
    from connbudget.probe.postgres import validate_dsn

    try:
        dsn, pgbouncer = probe_dsns(args)
    except UsageError as e:
        print(f"connbudget probe: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        # Both before connecting anywhere: a malformed DSN is named, its content never shown.
        validate_dsn(dsn)
        if pgbouncer:
            validate_dsn(pgbouncer)
        report = asyncio.run(_probe(dsn, pgbouncer))
    except ProbeError as e:
        print(f"connbudget probe: {e.failure}: {e}", file=sys.stderr)
        return EXIT_PROBLEMS
    print(json.dumps(report, indent=2) if args.json else render_probe_table(report))
    return EXIT_OK


# --- check ------------------------------------------------------------------------------------


def crd_schema() -> Mapping[str, Any]:
    """The ConnectionBudget's openAPIV3Schema, from the CRD shipped with the package."""
    text = resources.files("connbudget").joinpath("data", CRD_RESOURCE).read_text()
    crd = yaml.safe_load(text)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == VERSION)
    return cast(Mapping[str, Any], version["schema"]["openAPIV3Schema"])


def check_manifest(doc: object, schema: Mapping[str, Any]) -> list[str]:
    """Every problem of one ConnectionBudget manifest: schema first, then the operator's rules."""
    if not isinstance(doc, Mapping):
        return ["<root>: a manifest must be a mapping"]
    problems = []
    if doc.get("apiVersion") != f"{GROUP}/{VERSION}":
        problems.append(f"apiVersion: must be {GROUP}/{VERSION}")
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping) or not meta.get("name"):
        problems.append("metadata.name: required")
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}
    problems += validate(schema, body)
    spec = doc.get("spec")
    if isinstance(spec, Mapping):
        try:
            parse_spec(spec)
        except SpecError as e:
            problems += [p for p in e.problems if not any(p.split(":")[0] in q for q in problems)]
    return problems


DEFAULT_NAMESPACE = "default"  # a manifest without metadata.namespace, as kubectl's default


@dataclasses.dataclass(frozen=True)
class _Doc:
    label: str  # where it is: FILE#N
    doc: Mapping[str, Any]


def _yaml_files(names: Sequence[str]) -> Iterator[tuple[Path, bool]]:
    """Each file named, and each *.yaml/*.yml under a directory named (hidden ones skipped),
    with whether it was named (True) or found in a directory (False)."""
    for name in names:
        path = Path(name)
        if not path.is_dir():
            yield path, True
            continue
        for found in sorted(path.rglob("*")):
            hidden = any(p.startswith(".") for p in found.relative_to(path).parts)
            if found.suffix in (".yaml", ".yml") and found.is_file() and not hidden:
                yield found, False


def _read_documents(names: Sequence[str]) -> tuple[list[_Doc], int]:
    """Every mapping document of the files, and how many named files could not be read.

    A file found in a directory that is not YAML (a Helm template, say) is skipped with a note:
    a repository holds such files, and they are not manifests until rendered.
    """
    docs: list[_Doc] = []
    failed = 0
    for path, named in _yaml_files(names):
        try:
            loaded = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError) as e:
            if named:
                print(f"{path}: cannot read: {e}", file=sys.stderr)
                failed += 1
            else:
                print(f"{path}: skipped: not YAML ({type(e).__name__})", file=sys.stderr)
            continue
        docs += [_Doc(f"{path}#{i + 1}", d) for i, d in enumerate(loaded) if isinstance(d, Mapping)]
    return docs, failed


def _namespace_of(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata")
    ns = meta.get("namespace") if isinstance(meta, Mapping) else None
    return ns if isinstance(ns, str) and ns else DEFAULT_NAMESPACE


def check_admission(
    budgets: Sequence[Mapping[str, Any]], docs: Sequence[_Doc], *, strict: bool
) -> int:
    """Check the workloads of ``docs`` against the valid ``budgets``; return how many fail.

    A breach fails under Deny, and under Warn only when ``strict``; an invalid annotation or
    surge of a governed workload always fails.
    """
    workloads: list[admission.Workload] = []
    scalers: list[admission.Autoscaler] = []
    failed = 0
    for d in docs:
        try:
            w = admission.workload_of(d.doc, default_namespace=DEFAULT_NAMESPACE)
        except ValueError as e:
            print(f"{d.label}: {e}", file=sys.stderr)
            failed += 1
            continue
        if w is not None:
            workloads.append(w)
        a = admission.autoscaler_of(d.doc, default_namespace=DEFAULT_NAMESPACE)
        if a is not None:
            scalers.append(a)
    for doc in budgets:
        namespace = _namespace_of(doc)
        findings = admission.find_breaches(
            budget_name=f"{namespace}/{doc['metadata']['name']}",
            namespace=namespace,
            spec=parse_spec(doc["spec"]),
            workloads=workloads,
            autoscalers=scalers,
        )
        for f in findings:
            if f.problem:
                failed += 1
                print(f"error: {f.message}", file=sys.stderr)
            elif f.verdict is admission.Verdict.BREAKS and f.mode is AdmissionMode.DENY:
                failed += 1
                print(f"denied: {f.message}", file=sys.stderr)
            elif f.verdict is admission.Verdict.BREAKS:
                failed += strict
                print(f"warning: {f.message}", file=sys.stderr)
            elif f.verdict is admission.Verdict.FITS:
                print(f"fits: {f.message}")
            else:
                print(f.message)
    return failed


def cmd_check(args: argparse.Namespace) -> int:
    schema = crd_schema()
    docs, failed = _read_documents(args.files)
    found = 0
    valid: list[Mapping[str, Any]] = []
    for d in docs:
        if d.doc.get("kind") != KIND:
            continue
        found += 1
        label = f"{d.label} {((d.doc.get('metadata') or {}).get('name')) or '<unnamed>'}"
        problems = check_manifest(d.doc, schema)
        if problems:
            failed += 1
            for p in problems:
                print(f"{label}: {p}", file=sys.stderr)
        else:
            print(f"{label}: ok")
            valid.append(d.doc)
    failed += check_admission(valid, docs, strict=args.strict)
    if failed:
        print(
            f"{failed} problem{'s' if failed > 1 else ''} in {found} ConnectionBudgets, their"
            " workloads or files",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    if not found:
        print("no ConnectionBudget found", file=sys.stderr)
        return EXIT_PROBLEMS
    return EXIT_OK


def build_parser(prog: str = "connbudget") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"connbudget {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run the operator",
        description=(
            "Run the operator. Each setting comes from its flag, else from its CONNBUDGET_*"
            " variable, else its default."
        ),
    )
    run.add_argument(
        "--namespace",
        "-n",
        action="append",
        help=f"watch this namespace (repeat for more); default ${ENV_NAMESPACES} (comma-separated)"
        ", else every namespace",
    )
    run.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        help=f"watch every namespace, whatever ${ENV_NAMESPACES} says",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        help=f"Prometheus metrics port, 0 to disable; default ${ENV_METRICS_PORT}, else"
        f" {DEFAULT_METRICS_PORT}",
    )
    run.add_argument(
        "--liveness",
        help=f"liveness endpoint URL, empty to disable; default ${ENV_LIVENESS}, else"
        f" {DEFAULT_LIVENESS}",
    )
    run.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help=f"default ${ENV_LOG_FORMAT}, else json",
    )
    run.add_argument("--kubeconfig", help="kubeconfig outside a cluster (default: $KUBECONFIG)")
    run.add_argument(
        "--standalone",
        action="store_true",
        help=f"no leader election, for a single replica (or ${ENV_STANDALONE}=true)",
    )
    run.add_argument(
        "--shards",
        type=int,
        help=f"split the budgets into this many shards, each held by one replica through its own "
        f"Lease (1-{MAX_SHARDS}; default ${ENV_SHARDS}, else 1)",
    )
    run.add_argument(
        "--kube-qps",
        type=float,
        help=f"calls to the Kubernetes API a second after a burst, 0 for no limit (default "
        f"${ENV_KUBE_QPS}, else {DEFAULT_QPS:g}); Leases are not limited",
    )
    run.add_argument(
        "--kube-burst",
        type=int,
        help=f"calls to the Kubernetes API that may go at once (default ${ENV_KUBE_BURST}, "
        f"else {DEFAULT_BURST})",
    )
    run.set_defaults(func=cmd_run)
    probe = sub.add_parser(
        "probe",
        help="show who holds a database's connections",
        description=(
            "Show who holds a database's connections. The DSN comes from the DSN argument or"
            f" --dsn-file, else from ${DSN_ENV}; the PgBouncer admin DSN from --pgbouncer or"
            f" --pgbouncer-dsn-file, else from ${PGBOUNCER_DSN_ENV}. A DSN given as an argument"
            " is visible to every user of the machine (ps): prefer a file or the environment"
            " when it holds a password."
        ),
    )
    probe.add_argument(
        "dsn",
        nargs="?",
        help=f"libpq DSN or URI of a role with pg_monitor; visible in ps (see ${DSN_ENV})",
    )
    probe.add_argument("--dsn-file", metavar="FILE", help="read the DSN from FILE (- for stdin)")
    probe.add_argument(
        "--pgbouncer", metavar="DSN", help="PgBouncer admin console DSN (visible in ps)"
    )
    probe.add_argument(
        "--pgbouncer-dsn-file",
        metavar="FILE",
        help=f"read the PgBouncer admin DSN from FILE (- for stdin); or set ${PGBOUNCER_DSN_ENV}",
    )
    probe.add_argument("--json", action="store_true", help="print JSON")
    probe.set_defaults(func=cmd_probe)
    check = sub.add_parser(
        "check",
        help="validate ConnectionBudget manifests, and their workloads' worst case, offline",
        description=(
            "Validate ConnectionBudget manifests against the CRD and the operator's rules, then"
            " check each Deployment, StatefulSet and Rollout a budget selects: its replicas (or"
            " its HorizontalPodAutoscaler's maxReplicas) plus its rollout's maxSurge, times its"
            f" {admission.CONNECTIONS_PER_POD_ANNOTATION} annotation, plus the budget's other"
            " workloads, against the budget. A breach fails under spec.admission.mode Deny,"
            " and under Warn only with --strict; Off is not checked. Exit 1 on any problem."
        ),
    )
    check.add_argument(
        "files",
        nargs="+",
        help="YAML files (several documents each allowed) or directories (their *.yaml and"
        " *.yml files, hidden ones skipped)",
    )
    check.add_argument(
        "--strict",
        action="store_true",
        help="fail on a breach of a budget in Warn mode too (for CI)",
    )
    check.set_defaults(func=cmd_check)
    leaks_cmd = sub.add_parser(
        "leaks",
        help="show which workloads leak connections, and where",
        description=(
            "Show the workloads the operator finds leaking connections, from the"
            " ConnectionBudgets' status: leak rate, abandoned connections, the statements they"
            " last ran (literals stripped) and a hint. Also `kubectl connbudget leaks`."
        ),
    )
    leaks.add_arguments(leaks_cmd)
    leaks_cmd.set_defaults(func=leaks.cmd_leaks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Installed as kubectl-connbudget too, kubectl runs it for `kubectl connbudget ...`.
    plugin = Path(sys.argv[0]).name.startswith("kubectl-")
    args = build_parser("kubectl connbudget" if plugin else "connbudget").parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
