"""BENCHMARKS.md from the results of one run: tables, charts and each target, met or missed.

Nothing here measures: it only renders what the run measured (``results.json`` holds the same
figures). The text around the tables explains the method; the verdicts compare the figures with
the issue's targets, and where a target is missed, the "why" paragraphs are written from the
figures of the same run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from bench.common import Spread
from bench.exhaustion import SATURATED
from bench.footprint import footprint_setup

CHARTS = "tests/bench/charts"
PHASES = ("harm", "exhaustion", "latency", "probe", "footprint", "load", "shards")


def to_json(value: object) -> object:
    """``json.dumps`` default: a Spread as its fields."""
    if isinstance(value, Spread):
        return {"median": value.median, "min": value.low, "max": value.high, "n": value.n}
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def from_json(value: Any) -> Any:
    """The inverse of ``to_json`` over a whole results document."""
    if isinstance(value, dict):
        if set(value) == {"median", "min", "max", "n"}:
            return Spread(value["median"], value["min"], value["max"], value["n"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def _ok(met: bool) -> str:
    return "**met**" if met else "**missed**"


def _f(x: object, fmt: str = "{:.1f}") -> str:
    if isinstance(x, int | float) and not (isinstance(x, float) and math.isnan(x)):
        return fmt.format(x)
    return "n/a"


def render(r: dict[str, Any]) -> str:
    out = [
        "# Benchmarks",
        "",
        f"Run on {r['date']} on {r['machine']}, with `tests/bench/run`"
        + (" --quick (development figures, not the reference run)" if r.get("quick") else "")
        + f" (operator code: {r.get('operator', 'unknown')})"
        + (
            f"; it ran only {', '.join(r['phases_run'])}, and each other section says which run "
            "it comes from"
            if r.get("phases_run") and len(r["phases_run"]) < len(PHASES)
            else ""
        )
        + f"; the run took {r.get('total_seconds', 0) / 60:.1f} minutes. Every figure is "
        f"a median with the min-max over {r['repeats']} repeated runs where it says so; every "
        "comparison is a ratio of figures measured in the same run. Raw figures: "
        "`tests/bench/results.json`.",
        "",
        "The sandbox is the one the tests use (real kube-apiserver, etcd, "
        "kube-controller-manager, pods as local processes in their own network namespaces, "
        "PostgreSQL 15, PgBouncer); each benchmark starts its own PostgreSQL servers in it. "
        "Other work was running on the same machine, as it would on a shared node.",
        "",
    ]
    header = len(out)
    targets: list[tuple[str, str, str]] = []
    sections = {
        "harm": _harm,
        "exhaustion": _exhaustion,
        "latency": _latency,
        "probe": _probe,
        "footprint": _footprint,
        "load": _load,
        "shards": _shards,
        "faults": _faults,
    }
    for phase, section in sections.items():
        if phase not in r:
            continue
        data = dict(r[phase])
        origin = data.pop("from_run", None)
        lines = section(data, targets)
        if origin:
            # A phase kept from an earlier run (``--merge``): say which.
            lines[1:1] = [
                "",
                f"*From the run of {origin.get('date', 'an earlier date')}"
                + (" (--quick)" if origin.get("quick") else "")
                + f", operator code: {origin.get('operator', 'unknown')}; this run did not "
                "repeat it.*",
            ]
        out += lines
    summary = [
        "## Targets",
        "",
        "| target | figure | verdict |",
        "|---|---|---|",
        *[f"| {t} | {f} | {v} |" for t, f, v in targets],
        "",
    ]
    return "\n".join(out[:header] + summary + out[header:]) + "\n"


def _harm(h: dict[str, Any], targets: list[tuple[str, str, str]]) -> list[str]:
    """Do no harm: every scenario's damage, from the workloads', PostgreSQL's and the audit log."""
    out = [
        "## Do no harm: healthy apps through their lifecycle, leaks beside them",
        "",
        "Each scenario on its own PostgreSQL 15 (`max_connections` 100) and namespace, with the "
        "three-field ConnectionBudget (budget 80) and its own operator (see `tests/bench/harm.py` "
        "for the apps' habits and the events). Damage is counted from the workloads' own logs, "
        "PostgreSQL's log (terminations outside a shutdown of the server) and the API server's "
        "audit log (evictions), never from the operator's; a healthy request failed because of "
        "the operator only on a connection the operator terminated.",
        "",
        "| scenario | guard | healthy backends terminated | healthy requests: failed (by the "
        "operator) of all | healthy pods evicted / restarted | false LeakDetected | refused | "
        "peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, s in h.get("scenarios", {}).items():
        earlier = " (from the run before: this run played the other scenarios)"
        out.append(
            f"| {key}: {s['label']}{earlier if s.get('from_run') else ''} | {s['guard']} | "
            f"{s['healthy_terminated']} | "
            f"{s['healthy_failed']} ({s['healthy_failed_by_operator']}) of "
            f"{s.get('healthy_requests', '?')} | "
            f"{s['healthy_evicted']} / {s['healthy_restarted']} | {s['false_leak_events']} | "
            f"{s['refused']} | {s['peak']} |"
        )
    out.append("")
    leaks = [(k, s) for k, s in h.get("scenarios", {}).items() if s.get("leak")]
    if leaks:
        out += [
            "| leak scenario | requests | answered | paused (broken) | leak's backends "
            "terminated | container restarts | restartCause |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, s in leaks:
            lk = s["leak"]
            out.append(
                f"| {key} | {lk['requests']} | {lk['answered']} | {lk['paused']} "
                f"({lk['paused_broken']}) | {lk['terminated']} | {lk['container_restarts']} | "
                f"{s['restart_cause'] or '-'} |"
            )
        out.append("")
    apps = sorted({a["label"] for s in h.get("scenarios", {}).values() for a in s["apps"].values()})
    if apps:
        out += ["Workloads played: " + "; ".join(apps) + ".", ""]
    for key, err in h.get("errors", {}).items():
        out += [f"Scenario {key} did not complete: {err}", ""]
    for target, figure, met in h.get("targets", []):
        targets.append((target, figure, _verdict(met)))
    return out


def _verdict(met: bool | None) -> str:
    return "**no data**" if met is None else _ok(met)


def _n(x: object) -> str:
    return _f(x, "{:.0f}")


def _exhaustion(ex: dict[str, Any], targets: list[tuple[str, str, str]]) -> list[str]:
    su = ex["setup"]
    labels: dict[str, str] = su["strategies"]
    rates: dict[str, Any] = ex["rates"]
    inflight = su["inflight"]
    pools = "; ".join(
        f"{h['label']} ({h['connections']} connections, each reused after "
        f"{_n(h['gap'][0])}-{_n(h['gap'][1])} s)"
        for h in su["healthy"]
    )
    spec = json.dumps(su["spec"], separators=(", ", ": "))
    tg = su["targets"]
    out = [
        "## 1. The exhaustion scenario",
        "",
        f"A real leak beside real pools, for each leak rate ({', '.join(rates)} leaked "
        "connections per second, one rate after the other). Each strategy has its own "
        f"PostgreSQL 15 with `max_connections` {su['max_connections']} ({su['usable']} for "
        "clients: 3 slots are reserved for superusers), and the four strategies play at the same "
        "time, so they share the machine's conditions. In each strategy's namespace, every pod "
        "labelled `tier: shop`:",
        "",
        "- the leak: Django 5.0.1 under uvicorn (ASGI, `CONN_MAX_AGE` 0), whose driver (a second "
        "container of the same pod) abandons requests mid-request at the driven rate (at most "
        f"{_n(su['leak_pod_rate'])} per pod); each abandoned request leaks its connection "
        "(Django ticket #35059), after holding it idle "
        f"{inflight['INFLIGHT_IDLE_MIN']}-{inflight['INFLIGHT_IDLE_MAX']} s between two "
        "queries;",
        f"- healthy pools, without pre-ping or health checks: {pools}; one closed-loop lane "
        f"per connection, and {float(inflight['INFLIGHT_FRACTION']):.0%} of their requests idle "
        f"{inflight['INFLIGHT_IDLE_MIN']}-{inflight['INFLIGHT_IDLE_MAX']} s between two "
        "queries;",
        f"- a probe client opening a fresh connection every {su['probe_interval']} s, and a "
        f"sampler (superuser, never refused) counting backends every {su['sample_interval']} s.",
        "",
        "Strategies: " + "; ".join(labels.values()) + ". The ConnectionBudget is the three "
        f"fields a new user writes, every other field defaulted: `{spec}`; it selects the leak "
        "and the pools alike, so the operator must tell them apart by itself. The pools play "
        f"alone for {_n(ex['warmup'])} s first; each lane's window ({_n(ex['window'])} s) opens "
        "when its leak's driver starts sending.",
        "",
        "Everything is counted from the workloads and PostgreSQL, not from the operator. "
        "*Refused*: the probe client's refused connections plus the refusals in the apps' own "
        "request logs (the leak's and the pools'). *Healthy failed*: the pools' requests that "
        "failed, by the outcome their driver got from the app (`terminated`: a pooled idle "
        "connection found dead; `inflight_broken`: killed between two queries of a request; "
        "`refused`; `error`: anything else). *In-flight broken*: `inflight_broken` in any app's "
        "log, the leak's included. *Over budget*: sampled connections counted against the "
        f"budget (database `app`) above {su['budget']}; *full*: every unreserved slot in use. "
        "*Backends ended*: PostgreSQL's log (`terminating connection due to administrator "
        "command` or `... idle-session timeout`, with the backend's application_name, which is "
        "its pod). *Pods restarted*: pods replaced plus container restarts. *Leak-rate "
        "estimate*: the leak's `status.usage.byOwner[].leakRatePerMinute`, read every second.",
        "",
    ]
    for rk, res in rates.items():
        lanes: dict[str, Any] = res["lanes"]
        out += [
            f"### Leak of {rk} connections per second",
            "",
            f"{res['leak_pods']} leaking pod(s); leak requests sent "
            + ", ".join(
                f"{_f(ln['leak_sent_per_second'], '{:.2f}')}/s ({labels[k]})"
                for k, ln in lanes.items()
            )
            + f". The machine's cores were {_f(res['cpu_busy'] * 100, '{:.0f}')} % busy over "
            f"the window, saturated (at least {SATURATED:.0%}) {res['cpu_saturated_seconds']} of "
            f"{res['cpu_seconds']} seconds.",
            "",
            "| strategy | refused (probe + apps) | healthy failed (of requests), why | in-flight "
            "broken | s over budget (breaches, longest) | s full | peak counted | backends "
            "ended | pods restarted | leak-rate estimate |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k, ln in lanes.items():
            why = ", ".join(f"{n} {o}" for o, n in ln["healthy_failed_by_outcome"].items() if n)
            ended = (
                ", ".join(
                    f"{w}: " + " + ".join(f"{n} {c}" for c, n in causes.items())
                    for w, causes in ln["backends_ended"].items()
                )
                or "0"
            )
            restarted = sum(ln["pods_restarted"].values())
            est = ln.get("leak_estimate")
            est_s = "n/a"
            if est:
                fw = est["first_within"]
                est_s = (
                    (
                        f"within {tg['rate_tolerance']:.0%} after {_f(fw, '{:.0f}')} s"
                        if fw is not None
                        else f"never within {tg['rate_tolerance']:.0%}"
                    )
                    + f"; at the end {_f(est['end'], '{:.2f}')}/s "
                    + f"(driven {_f(est['driven'], '{:g}')})"
                )
            out.append(
                f"| {labels[k]} | {ln['refused']['total']} ({ln['refused']['probe']} of "
                f"{ln['probe_attempts']} + {ln['refused']['apps']}) | {ln['healthy_failed']} (of "
                f"{ln['healthy_requests']}){': ' + why if why else ''} | "
                f"{ln['inflight_broken']} | {_f(ln['seconds_over_budget'])} ({ln['breaches']}, "
                f"{_f(ln['longest_breach'])} s) | {_f(ln['seconds_full'])} | {ln['peak']} | "
                f"{ended} | {restarted} | {est_s} |"
            )
        cb = lanes.get("cb")
        if cb and cb.get("operator_events") is not None:
            ev = ", ".join(f"{r} {n}" for r, n in sorted(cb["operator_events"].items())) or "none"
            classes = (cb.get("leak_estimate") or {}).get("classes") or {}
            cls = ", ".join(f"{c} {n} s" for c, n in sorted(classes.items())) or "never named"
            owners = (cb.get("leak_estimate") or {}).get("owners") or {}
            judged = "; ".join(
                f"{w}: "
                + (", ".join(f"{c} {n} s" for c, n in sorted(j["classes"].items())) or "no class")
                + f", abandon age {_f(j.get('abandon_after'))} s, longest reuse gap "
                + (
                    f"{_f(j['max_reuse_gap'])} s"
                    if isinstance(j.get("max_reuse_gap"), int | float)
                    else "none seen"
                )
                for w, j in owners.items()
            )
            out += [
                "",
                f"connbudget's Events (count per reason): {ev}. The leak's class in its status, "
                f"seconds read as each: {cls}."
                + (
                    f" How the status judged each workload over the window (seconds read as "
                    f"each class; the last abandon age and longest reuse gap): {judged}."
                    if judged
                    else ""
                ),
            ]
        if cb and cb["breaches"]:
            leak = ((cb.get("leak_estimate") or {}).get("owners") or {}).get("leak") or {}
            age = leak.get("abandon_after")
            out += [
                "",
                f"**connbudget at {rk}/s stays near the budget.** It was over the budget "
                f"{_f(cb['seconds_over_budget'])} s of {_n(ex['window'])} s, in "
                f"{cb['breaches']} short breaches (the longest {_f(cb['longest_breach'])} s), "
                f"and {_f(cb['seconds_full'])} s at a full server"
                + (
                    f": it terminates the leak's connections once idle {_f(age)} s (the "
                    f"abandon age in its status), and by then {_n(float(rk) * age)} of them "
                    f"(the rate times that age) are open, with the pools' on top."
                    if isinstance(age, int | float)
                    else "."
                ),
            ]
        out += ["", f"![leak of {rk}/s]({CHARTS}/exhaustion-{rk}.png)", ""]
    _exhaustion_targets(ex, targets)
    return out


def exhaustion_verdicts(ex: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Each exhaustion target for connbudget: ``(target, figures, met)`` (None: not measured)."""
    tg = ex["setup"]["targets"]
    rates: dict[str, Any] = ex["rates"]
    cbs = {rk: res["lanes"]["cb"] for rk, res in rates.items() if "cb" in res["lanes"]}
    found: list[tuple[str, str, bool | None]] = []

    def each(key: str) -> str:
        return "; ".join(f"{rk}/s: {key_of(ln, key)}" for rk, ln in cbs.items())

    def key_of(ln: dict[str, Any], key: str) -> object:
        return ln["refused"]["total"] if key == "refused" else ln[key]

    low = {rk: ln for rk, ln in cbs.items() if float(rk) < 20}
    if low:
        found.append(
            (
                "connbudget: 0 refused at "
                + " and ".join(f"{rk}" for rk in low)
                + " connections/s",
                "; ".join(f"{rk}/s: {ln['refused']['total']}" for rk, ln in low.items()),
                all(ln["refused"]["total"] == 0 for ln in low.values()),
            )
        )
    for rk, ln in cbs.items():
        if float(rk) < 20:
            continue
        none = rates[rk]["lanes"].get("none")
        base = none["refused"]["total"] if none else None
        share = tg["refused_share_at_20"]
        found.append(
            (
                f"connbudget: at most {share:.0%} of no guard's refusals at {rk}/s",
                f"{ln['refused']['total']} vs {base}"
                + (f" ({ln['refused']['total'] / base:.2%})" if base else ""),
                None if not base else ln["refused"]["total"] <= share * base,
            )
        )
    if cbs:
        found.append(
            (
                "connbudget: 0 healthy requests failed",
                each("healthy_failed"),
                all(ln["healthy_failed"] == 0 for ln in cbs.values()),
            )
        )
        found.append(
            (
                "connbudget: 0 in-flight requests broken",
                each("inflight_broken"),
                all(ln["inflight_broken"] == 0 for ln in cbs.values()),
            )
        )
        found.append(
            (
                f"connbudget: back within the budget within {tg['breach_within']:g} s of each "
                "breach",
                "; ".join(
                    f"{rk}/s: {ln['breaches']} breaches, longest {ln['longest_breach']:.1f} s"
                    for rk, ln in cbs.items()
                ),
                all(ln["longest_breach"] <= tg["breach_within"] for ln in cbs.values()),
            )
        )
        ests = {rk: ln["leak_estimate"] for rk, ln in cbs.items()}
        found.append(
            (
                f"connbudget: leak rate within {tg['rate_tolerance']:.0%} of the driven rate "
                f"within {tg['rate_within']:g} s of the leak starting",
                "; ".join(
                    f"{rk}/s: "
                    + (
                        f"after {e['first_within']:.0f} s"
                        if e and e["first_within"] is not None
                        else "never"
                    )
                    + (f", {_f(e['end'], '{:.2f}')}/s at the end" if e else "")
                    for rk, e in ests.items()
                ),
                all(
                    e is not None
                    and e["first_within"] is not None
                    and e["first_within"] <= tg["rate_within"]
                    for e in ests.values()
                ),
            )
        )
    for rk, ln in cbs.items():
        ist = rates[rk]["lanes"].get("ist10")
        if not ist:
            continue
        found.append(
            (
                f"connbudget at {rk}/s, beside idle_session_timeout 10 s: at least as few "
                "refusals, fewer failed healthy requests",
                f"refused {ln['refused']['total']} vs {ist['refused']['total']}; healthy failed "
                f"{ln['healthy_failed']} vs {ist['healthy_failed']}",
                ln["refused"]["total"] <= ist["refused"]["total"]
                and ln["healthy_failed"] < ist["healthy_failed"],
            )
        )
    return found


def _exhaustion_targets(ex: dict[str, Any], targets: list[tuple[str, str, str]]) -> None:
    for target, figure, met in exhaustion_verdicts(ex):
        targets.append((target, figure, _verdict(met)))


def _latency(lat: dict[str, Any], targets: list[tuple[str, str, str]]) -> list[str]:
    out = [
        "## 2. Reaction latency",
        "",
        "Episodes in their own namespaces, each with a ConnectionBudget of 10 connections "
        "(`scope: Selected`, `breachSeconds` 10, step TerminateIdle) and one leaky pod that "
        "opens 2 connections per second up to 16 and then stops. The episodes of one poll "
        "interval play at the same time against one server, each starting at a random moment of "
        "its budget's poll cycle. A sampler reads `pg_stat_activity` 5 times a second and "
        "attributes backends to episodes by pod address. The breach is *sustained* "
        "`breachSeconds` after the first sample over the budget (the spec's definition); the "
        "reaction is from then to the operator's first remediation call (its `action` log "
        "record, written when the call returned), and the recovery from then to the first "
        "sample back within the budget.",
        "",
        "| poll | episodes | reaction p50 | reaction p99 | recovery p50 | recovery p99 | "
        "target (p99) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in lat.values():
        met = res["measured"] >= 20 and res["reaction_p99"] <= res["target"]
        out.append(
            f"| {res['poll']} s | {res['measured']} of {res['episodes']} | "
            f"{_f(res['reaction_p50'], '{:.2f}')} s | {_f(res['reaction_p99'], '{:.2f}')} s | "
            f"{_f(res['recovery_p50'], '{:.2f}')} s | {_f(res['recovery_p99'], '{:.2f}')} s | "
            f"<= {res['target']:.0f} s | {_ok(met)} |"
        )
        targets.append(
            (
                f"reaction p99 within one poll interval plus one second (poll {res['poll']} s)",
                f"p99 {_f(res['reaction_p99'], '{:.2f}')} s over {res['measured']} episodes",
                _ok(met),
            )
        )
    early = [x for res in lat.values() for x in res["reactions"] if x < 0]
    if early:
        out += [
            "",
            f"**A finding.** {len(early)} episodes acted before `breachSeconds` had passed by "
            f"the sampler's clock (by up to {-min(early):.2f} s). The operator keeps the start "
            "of a breach to the millisecond, measured by its own probe, which can see a breach "
            "up to one sampling interval (0.2 s) before the sampler does; "
            + (
                "every early reaction here is within that."
                if -min(early) <= 0.25
                else "an earlier reaction than that is not explained by sampling and needs a look."
            ),
        ]
    out += [
        "",
        "With 20 episodes the p99 is the slowest episode (nearest rank).",
        "",
        f"![reaction latency]({CHARTS}/latency.png)",
        "",
    ]
    return out


def _probe(p: dict[str, Any], targets: list[tuple[str, str, str]]) -> list[str]:
    big = p.get("backends1000")
    st = big if big and "statements_ms" in big else None
    grouped = bool(big and "grouped_ms" in big)
    out = [
        "## 3. Probe cost against its floor",
        "",
        "The operator's per-poll database call (`Monitor.sample()`: its one query over "
        "`pg_stat_get_activity`: every client backend's pid, and the detail of only the backends "
        "new or changed since its last sample, grouped by the monitor into typed samples) against "
        "`SELECT count(*) FROM pg_stat_activity` on a connection opened the same way, same "
        "server, interleaved call by call, "
        f"{p.get('iterations', 100)} calls of each per repeat. Client backends are idle "
        "connections spread over 100 application names, as 100 pods would hold them"
        + (
            f", each of which last ran a statement with literals ({_n(st['statement_chars'])} "
            "characters, a lookup of a user by id) before going idle."
            if st
            else "."
        )
        + (
            " Two more references, timed with them: a grouped count (`SELECT datname, usename, "
            "application_name, client_addr, state, count(*) ... GROUP BY` those five), what the "
            "issue names as a poll's cost within a budget; and a poll in which every backend is "
            "new or changed (the first poll, or a server whose every connection moved since the "
            "last), the query asking every detail and its decoding."
            if grouped
            else ""
        ),
        "",
        "| client backends | probe | floor | ratio (probe / floor) | the probe's query alone "
        "(no decoding) |" + (" grouped count | every backend in detail |" if grouped else ""),
        "|---|---|---|---|---|" + ("---|---|" if grouped else ""),
    ]
    for key, row in p.items():
        if not key.startswith("backends"):
            continue
        line = (
            f"| {row['backends']} | {row['probe_ms'].show('{:.2f}', ' ms')} | "
            f"{row['floor_ms'].show('{:.2f}', ' ms')} | {row['ratio'].show('{:.2f}', 'x')} | "
            f"{row['query_ms'].show('{:.2f}', ' ms')} ({row['query_ratio'].show('{:.2f}', 'x')}) |"
        )
        if "grouped_ms" in row:
            line += (
                f" {row['grouped_ms'].show('{:.2f}', ' ms')} "
                f"({row['grouped_ratio'].show('{:.2f}', 'x')}) | "
                f"{row['full_ms'].show('{:.2f}', ' ms')} "
                f"({row['full_ratio'].show('{:.2f}', 'x')}) |"
            )
        out.append(line)
    if big:
        met = big["ratio"].median <= 1.5
        targets.append(
            (
                "probe at most 1.5x its floor at 1,000 backends",
                f"{big['ratio'].show('{:.2f}', 'x')} ({big['probe_ms'].show('{:.2f}', ' ms')} vs "
                f"{big['floor_ms'].show('{:.2f}', ' ms')})",
                _ok(met),
            )
        )
        if grouped:
            out += [
                "",
                f"At {big['backends']} backends the probe costs "
                f"{big['probe_vs_grouped'].show('{:.2f}', 'x')} a grouped count, which itself "
                f"costs {big['grouped_ratio'].show('{:.2f}', 'x')} the floor; its query alone, "
                f"without decoding, {big['query_ratio'].show('{:.2f}', 'x')}. A poll in which "
                f"every backend comes in detail costs {big['full_ratio'].show('{:.2f}', 'x')} "
                "the floor: what each poll cost before the detail was limited to what changed, "
                "and what a poll of a server whose every connection moved since the last still "
                "costs.",
            ]
        if not met:
            out += [
                "",
                "**Why the target is missed.** The floor only counts rows. The probe's query "
                "returns every client backend's pid (the evidence follows each backend poll "
                "after poll) and the detail of those that changed"
                + (
                    f"; without decoding it costs {big['query_ratio'].show('{:.2f}', 'x')} the "
                    "floor"
                    if "query_ratio" in big
                    else ""
                )
                + ", and the rest is the monitor's own grouping in Python (the backends "
                "grouped by database, user, application, address and state once the server "
                "no longer groups them, only the groups a change touched rebuilt)"
                + (
                    f"; a grouped count on the server, the shape before, alone costs "
                    f"{big['grouped_ratio'].show('{:.2f}', 'x')} the floor"
                    if grouped
                    else ""
                )
                + ". What is left to take: each group's per-backend ages are rebuilt every poll "
                "because they are held as seconds since the sample; held as moments, unchanged "
                "groups could be reused as they are.",
            ]
    if st:
        out += [
            "",
            "**What naming a leak's statement adds.** While a workload leaks, a poll that finds "
            "connections of it not asked about before also fetches their last statements "
            f"(`Monitor.statements()`, at most {st['statements_asked']} per poll; each "
            "connection is asked about once in its life, since an abandoned connection's last "
            "statement no longer changes) and normalises each (`statement_of()`, literals "
            f"stripped). At {st['backends']} backends, fetching the statements of "
            f"{st['statements_asked']} idle connections ({st['statements_found']} found, "
            f"{st['statements_shown']} with a shape to show) and normalising them took "
            f"{st['statements_ms'].show('{:.2f}', ' ms')} "
            f"({st['statements_ratio'].show('{:.2f}', 'x')} the floor), interleaved with the "
            "calls above; its query alone, without decoding or normalising, took "
            f"{st['statements_query_ms'].show('{:.2f}', ' ms')}. A poll that does both, the "
            "probe and then the statements, took "
            f"{st['with_statements_ms'].show('{:.2f}', ' ms')}: "
            f"{st['with_statements_ratio'].show('{:.2f}', 'x')} the floor, against "
            f"{st['ratio'].show('{:.2f}', 'x')} for the probe alone. That is the worst case: a "
            "poll asks about fewer connections when fewer new ones leaked since the last, and "
            "about none while no workload leaks.",
        ]
    pb = p.get("pgbouncer")
    if pb:
        out += [
            "",
            f"PgBouncer with {pb['clients']} clients (session pooling): `SHOW CLIENTS` on an open "
            f"admin connection takes {pb['show_clients_ms'].show('{:.2f}', ' ms')}, "
            f"{pb['ratio'].show('{:.1f}', 'x')} `SHOW VERSION` on the same connection "
            f"({pb['show_version_ms'].show('{:.2f}', ' ms')}); the operator's per-poll pooler "
            "probe of one pooler pod (connect, `SHOW POOLS`, `SHOW CLIENTS`, decode) takes "
            f"{pb['per_poll_ms'].show('{:.1f}', ' ms')}.",
        ]
    out.append("")
    return out


# The import figures named in the footprint section besides the operator's, each with its label.
_IMPORT_LABELS = {
    "kopf": "kopf",
    "kubernetes": "the Kubernetes client",
    "psycopg": "psycopg",
    "prometheus_client": "prometheus_client",
}


def _footprint_imports(fp: dict[str, Any]) -> list[str]:
    """The import memory paragraph, or nothing for a run that did not measure it."""
    mb: dict[str, float] = fp.get("import_rss_mb") or {}
    if "operator" not in mb or "interpreter" not in mb:
        return []
    repeats = fp.get("import_rss_repeats")
    others = ", ".join(f"{label} {mb[k]:.0f} MB" for k, label in _IMPORT_LABELS.items() if k in mb)
    return [
        "Import memory: a fresh interpreter's resident memory once it has imported the operator "
        "(what `connbudget run` imports before kopf starts) or one of its dependencies"
        + (f", the median of {repeats} interpreters each" if repeats else "")
        + f". The operator {mb['operator']:.0f} MB"
        + (f"; {others}" if others else "")
        + f". Each figure includes the bare interpreter's {mb['interpreter']:.0f} MB, and they "
        "overlap: kopf imports the Kubernetes client itself whenever it is installed.",
        "",
    ]


def _footprint(fp: dict[str, Any], targets: list[tuple[str, str, str]]) -> list[str]:
    # A run that did not record its setup (before 2026-12-03) ran with today's constants.
    su = {**footprint_setup(), **(fp.get("setup") or {})}
    rss_target, cpu_target = su["rss_target_mb"], su["cpu_target_percent"]
    rows = fp["rows"]
    out = [
        "## 4. Footprint and scale",
        "",
        "One operator (a fresh process for each count), ConnectionBudgets with the default poll "
        f"({su['poll_seconds']:g} s) spread over {su['namespaces']} namespaces and "
        f"{su['databases']} databases of one server, each selecting one of {su['pods']} pods "
        "(pods without processes). Measured over a window once every budget had been probed and "
        f"{su['settle_seconds']:g} s more had passed: resident memory (VmRSS, the highest "
        "sample), CPU (user + system time over the window), each budget's probes in the window "
        "(from the operator's probe histogram), and the monitoring connections it holds "
        "(`pg_stat_activity`).",
        "",
        "| budgets | resident memory | CPU (% of one core) | probes per budget in window | "
        "cadence | mean per-poll probe | DB connections (databases) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        sp = row["probes_per_budget"]
        out.append(
            f"| {row['budgets']} | {row['rss_mb']:.1f} MB | {row['cpu_percent']:.2f} % | "
            f"{sp.show('{:.0f}')} in {row['window_seconds']:.0f} s (at least "
            f"{row['expected_probes_min']}) | {'kept' if row['cadence_kept'] else 'missed'} | "
            f"{row['probe_ms_mean']:.1f} ms | {row['db_connections']} ({row['databases']}) |"
        )
    m = fp["marginal"]
    out += [
        "",
        f"Marginal cost per budget: {m['rss_kb_per_budget']:.0f} KB of resident memory and "
        f"{m['cpu_percent_per_100_budgets']:.2f} % of a core per 100 budgets.",
        "",
        *_footprint_imports(fp),
        f"![footprint]({CHARTS}/footprint.png)",
        "",
    ]
    top = rows.get(str(su["target_budgets"]))
    first = next(iter(rows.values()))
    imported = (fp.get("import_rss_mb") or {}).get("operator")
    if top and (top["rss_mb"] > rss_target or top["cpu_percent"] > cpu_target):
        per_poll_ms = top["cpu_percent"] / 100 * su["poll_seconds"] / top["budgets"] * 1000
        out += [
            "**Why targets are missed, and what would fix them.**",
            "",
        ]
        if top["rss_mb"] > rss_target:
            within = (rss_target - first["rss_mb"]) * 1024 / max(m["rss_kb_per_budget"], 1)
            out += [
                f"- Memory: {first['rss_mb']:.0f} MB with a single budget is a fixed cost: "
                + (
                    f"importing the operator takes {imported:.0f} MB of it (above), and the "
                    "client's worker threads, TLS contexts and kopf's watch machinery add the "
                    f"rest, about {first['rss_mb'] - imported:.0f} MB. "
                    if isinstance(imported, int | float)
                    else "the operator's imports, the client's worker threads, TLS contexts and "
                    "kopf's watch machinery. "
                )
                + f"Each budget, with its pod, adds {m['rss_kb_per_budget']:.0f} KB (not "
                "broken down by this benchmark: kopf's state for both objects and the last body "
                "its watch delivered, the operator's caches and written status, the budget's "
                "metric series). What would fix it: drop the Kubernetes client "
                "package altogether and make the operator's few calls (Secret reads, evictions, "
                "/scale, status patches, Events, the Lease) through kopf's aiohttp-based API "
                "access; only then does kopf stop importing the client. The project requires "
                "the client as a dependency, so this is not done; at the measured marginal cost "
                f"one operator stays within {rss_target:g} MB up to about "
                f"{max(0, int(within)):,} budgets, and larger fleets can be split between "
                "operators by `watchNamespaces`.",
            ]
        if top["cpu_percent"] > cpu_target:
            out.append(
                f"- CPU: at {top['budgets']} budgets each budget's poll costs about "
                f"{per_poll_ms:.1f} ms of CPU (the window's CPU time over its polls), against "
                f"{first['cpu_percent'] / 100 * su['poll_seconds'] * 1000:.1f} ms for the "
                "whole operator with one budget. The database is sampled once per slot for "
                "all its budgets and a sample is attributed once per namespace; what is left "
                "per budget is its own cycle (its slice of the census, its evidence, its "
                "decision, its status and metrics) and its share of the watch traffic."
            )
        out.append("")
    startup = sum(r.get("warnings_no_pods_selected", 0) for r in rows.values())
    if startup:
        out += [
            f"**A finding.** While starting, the operator logged {startup} `NoPodsSelected` "
            "warnings (and posted the matching Events) for budgets whose pods did exist: "
            "their first cycle ran before the pod watch had delivered every pod. It heals at "
            "the next poll, but it is a false alarm on every restart with many pods; the "
            "workers should start only once the pod watch has listed every pod.",
            "",
        ]
    if top:
        targets.append(
            (
                f"at most {rss_target:g} MB resident at {su['target_budgets']} budgets",
                f"{top['rss_mb']:.1f} MB",
                _ok(top["rss_mb"] <= rss_target),
            )
        )
        targets.append(
            (
                f"at most {cpu_target:g} % of one core at {su['target_budgets']} budgets",
                f"{top['cpu_percent']:.2f} %",
                _ok(top["cpu_percent"] <= cpu_target),
            )
        )
    one = rows.get(str(first["budgets"])) if first["budgets"] == 1 else None
    many, biggest = rows.get(str(su["ratio_budgets"])), rows.get(str(su["memory_budgets"]))
    if one and many and one["cpu_percent"] > 0:
        ratio = many["cpu_percent"] / one["cpu_percent"]
        targets.append(
            (
                f"CPU scales with databases: {many['budgets']} budgets over {su['databases']} "
                f"databases at most {su['cpu_ratio_target']:g}x the CPU of one budget",
                f"{ratio:.1f}x ({many['cpu_percent']:.2f} % vs {one['cpu_percent']:.2f} %)",
                _ok(ratio <= su["cpu_ratio_target"]),
            )
        )
    if one and biggest:
        per = (biggest["rss_mb"] - one["rss_mb"]) * 1024 / (biggest["budgets"] - one["budgets"])
        targets.append(
            (
                f"{biggest['budgets']} budgets on one replica within {su['memory_target_mb']:g} "
                f"MB, at most {su['per_budget_kb_target']:g} KB per budget above one",
                f"{biggest['rss_mb']:.1f} MB, {per:.0f} KB per budget",
                _ok(
                    biggest["rss_mb"] <= su["memory_target_mb"]
                    and per <= su["per_budget_kb_target"]
                ),
            )
        )
    ok_conns = all(r["db_connections"] == r["databases"] for r in rows.values())
    targets.append(
        (
            "database connections held = distinct databases",
            ", ".join(f"{r['db_connections']} for {r['databases']}" for r in rows.values()),
            _ok(ok_conns),
        )
    )
    targets.append(
        (
            "every budget keeps its poll cadence",
            ", ".join(
                f"{r['budgets']}: {'kept' if r['cadence_kept'] else 'missed'}"
                for r in rows.values()
            ),
            _ok(all(r["cadence_kept"] for r in rows.values())),
        )
    )
    return out


def _load(ld: dict[str, Any], targets: list[tuple[str, str, str]]) -> list[str]:
    out = [
        "## Load and soak (issue 7)",
        "",
        f"{ld['budgets']} ConnectionBudgets (default poll, 10 namespaces, 5 databases), "
        f"{ld['pods']} pods, {ld['backends']} client backends (two per pod, named after it, "
        "each running a query about once a minute, so none is idle long enough to count as "
        "leaked), "
        f"for {ld['minutes']:g} minutes, one operator. Each minute: the highest resident "
        "memory, CPU, and each budget's probes (cadence kept if every budget probed at least "
        + (
            f"{ld['segments'][0]['expected_probes_min']} times: a {ld['poll_seconds']:g} s poll, "
            "a second of slack per poll)."
            if "poll_seconds" in ld and ld["segments"]
            else "as often as its poll allows, with a second of slack per poll)."
        ),
        "",
        "| minute | resident memory | CPU | probes per budget | cadence | mean per-poll probe |",
        "|---|---|---|---|---|---|",
    ]
    for s in ld["segments"]:
        out.append(
            f"| {s['minute']} | {s['rss_mb']:.1f} MB | {s['cpu_percent']:.2f} % | "
            f"{s['probes_per_budget'].show('{:.0f}')} | "
            f"{'kept' if s['cadence_kept'] else 'missed'} | {s['probe_ms_mean']:.1f} ms |"
        )
    out += [
        "",
        f"Memory: {ld['rss_first_mb']:.1f} MB at the start, {ld['rss_last_mb']:.1f} MB at the "
        f"end ({ld['rss_growth_mb']:+.1f} MB; fitted slope {ld['rss_slope_mb_per_min']:+.2f} "
        f"MB per minute). Probe errors: {ld['probe_errors']:.0f}; warnings or errors logged: "
        f"{ld['warnings']} during the soak, {ld.get('startup_warnings', 0)} while the "
        f"operator started; actions: {ld['actions']:.0f} (every budget is within its budget); "
        f"client backends at the end: {ld.get('backends_at_end', 'n/a')}.",
        "",
        "The mean per-poll probe time here is the operator's own histogram "
        "(`connbudget_probe_duration_seconds`), measured from the budget's worker: with all "
        "budgets polled on the same ticks, it includes waiting for the database's shared "
        "monitoring connection (one query at a time) and for the event loop, busy with the other "
        "budgets' cycles, so it is far above the probe's isolated cost in benchmark 3.",
        "",
        f"![soak]({CHARTS}/soak.png)",
        "",
    ]
    ratio = ld.get("cpu_vs_one_budget")
    if ratio is not None:
        out[-2:-2] = [
            f"One budget alone over the same pods and backends, measured first in the same run, "
            f"used {ld['baseline_cpu_percent']:.2f} % of a core; the soak's minutes used "
            f"{ratio.show('{:.1f}', 'x')} that.",
            "",
        ]
        targets.append(
            (
                f"soak CPU at most 5x one budget's over the same {ld['backends']} backends",
                f"{ratio.show('{:.1f}', 'x')} ({ld['cpu_percent'].show('{:.2f}', ' %')} vs "
                f"{ld['baseline_cpu_percent']:.2f} %)",
                _ok(ratio.median <= 5),
            )
        )
    targets.append(
        (
            f"load: {ld['budgets']} budgets, {ld['pods']} pods, {ld['backends']} backends, "
            f"{ld['minutes']:g} min: cadence, no errors, flat memory",
            f"cadence {'kept' if ld['cadence_kept'] else 'missed'}, {ld['probe_errors']:.0f} "
            f"probe errors, {ld['warnings']} warnings, memory {ld['rss_growth_mb']:+.1f} MB",
            _ok(
                ld["cadence_kept"]
                and ld["probe_errors"] == 0
                and ld["warnings"] == 0
                and ld["memory_flat"]
            ),
        )
    )
    return out


def _shards(sh: dict[str, Any], targets: list[tuple[str, str, str]]) -> list[str]:
    """A fleet larger than one replica (``bench.shards``)."""
    n = sh["replicas"]
    out = [
        "## 5. Shards: a fleet larger than one replica",
        "",
        f"{sh['budgets']:,} ConnectionBudgets (default poll) over {sh['pods']} pods without "
        f"processes and {sh['databases']} databases, {n} replicas with {sh['shards']} shards "
        "(`--shards`). Once every budget had been probed ("
        + (
            f"after {sh['first_probe_all_seconds']:.0f} s"
            if sh.get("first_probe_all_seconds") is not None
            else "which did not happen within the wait: measured as it stood"
        )
        + f"), a {sh['window_seconds']:.0f} s window: each "
        "replica's resident memory and CPU, every budget's probes summed over the replicas, and "
        "the budgets probed by more than one replica. Then the replica holding shard 0 was "
        "killed (SIGKILL, no hand-over).",
        "",
        "| replica | shards held | budgets probed | resident memory | CPU (% of one core) "
        "| API calls' wait for the token bucket |",
        "|---|---|---|---|---|---|",
    ]
    throttled = sh.get("throttled_seconds") or [None] * n
    for i in range(n):
        wait = throttled[i]
        out.append(
            f"| {i + 1} | {', '.join(map(str, sh['shards_held'][i])) or 'none'} | "
            f"{sh['budgets_per_replica'][i]:,} | {sh['rss_mb'][i]:.1f} MB | "
            f"{sh['cpu_percent'][i]:.2f} % | "
            + ("n/a (not measured)" if wait is None else f"{wait:.0f} s in all")
            + " |"
        )
    taken, probed = sh.get("failover_lease_seconds"), sh.get("failover_probed_seconds")
    out += [
        "",
        f"Probes per budget in the window: {sh['probes_per_budget'].show('{:.0f}')} (at least "
        f"{sh['expected_probes_min']} keeps the cadence: "
        f"{'kept' if sh['cadence_kept'] else 'missed'}); budgets probed by two replicas: "
        f"{sh['probed_twice']}. Killing the holder of shards "
        f"{', '.join(map(str, sh['failover_shards']))} ({sh['failover_budgets']:,} budgets): "
        "the survivors held their Leases after "
        + (f"{taken:.1f} s" if taken is not None else "more than the wait (never)")
        + " and had probed every one of those budgets again after "
        + (f"{probed:.1f} s" if probed is not None else "more than the wait (never)")
        + ".",
        "",
    ]
    targets.append(
        (
            f"{sh['budgets']:,} budgets over {sh['shards']} shards: cadence kept, none handled "
            "twice",
            f"cadence {'kept' if sh['cadence_kept'] else 'missed'}, {sh['probed_twice']} twice",
            _ok(sh["cadence_kept"] and sh["probed_twice"] == 0),
        )
    )
    targets.append(
        (
            "shard failover within 15 s (its Leases held by a survivor)",
            f"{taken:.1f} s" if taken is not None else "never",
            _ok(taken is not None and taken <= 15),
        )
    )
    return out


def _faults(f: dict[str, Any], targets: list[tuple[str, str, str]]) -> list[str]:
    """The fault run (``tests/bench/faults``, its own command; figures from faults.json)."""
    checked = f["checked"]
    out = [
        "## Fault run (issue 12)",
        "",
        f"`tests/bench/faults --seed {f['seed']}`, {f['duration_s'] / 60:.0f} minutes, run on "
        f"{f.get('date', 'n/a')}: two operator replicas under leader election while leaky, "
        "pooled and steady workloads run, and faults injected one at a time from the seeded RNG. "
        "Every invariant is judged from outside the operator: PostgreSQL's log (each "
        "administrator termination, against a superuser sample of `pg_stat_activity` every "
        "0.25 s), the API server's audit log (evictions, deletions, Lease writes) and status "
        "sampled every 0.5 s. Raw figures: `tests/bench/faults.json`.",
        "",
        "| fault | injected | noticed in status after (s) | recovered after (s) |",
        "|---|---|---|---|",
    ]
    for kind, n in f["faults"].items():
        notice = f["time_to_notice_s"].get(kind) or []
        recover = f["time_to_recover_s"].get(kind) or []
        takeover = (f.get("leader_takeover_s") or {}).get(kind)
        out.append(
            f"| {kind} | {n} | {_spread(notice)} | {_spread(recover)}"
            + (
                f"; Lease taken over after {_spread([t for t in takeover if t is not None])}"
                if takeover
                else ""
            )
            + " |"
        )
    growth = [g for g in f.get("rss_growth_mb", {}).values() if g is not None]
    out += [
        "",
        f"Judged: {checked['terminations']} terminations, {checked['evictions']} evictions, "
        f"{checked['lease_terms']} Lease terms ({checked['operator_actions']} actions logged by "
        f"{checked['replicas_started']} replicas), {checked['status_samples']} status samples. "
        f"Resident memory growth per replica: "
        + (", ".join(f"{g:+.1f} MB" for g in growth) or "n/a")
        + f". Violations: {len(f['violations'])}.",
        "",
    ]
    kinds: dict[str, int] = {}
    for v in f["violations"]:
        kinds[v["invariant"]] = kinds.get(v["invariant"], 0) + 1
    out += [f"- {k}: {n} (first: `{_first(f, k)}`)" for k, n in sorted(kinds.items())]
    out += [""] if kinds else []
    targets.append(
        (
            "fault run: no invariant broken",
            f"{len(f['violations'])} violations in {f['faults_injected']} faults",
            _ok(not f["violations"]),
        )
    )
    return out


def _first(f: dict[str, Any], invariant: str) -> str:
    evidence = next(v["evidence"] for v in f["violations"] if v["invariant"] == invariant)
    return str(evidence)[:300].replace("`", "'").replace("|", "/")


def _spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    vs = sorted(values)
    return f"{vs[len(vs) // 2]:.1f} ({vs[0]:.1f}-{vs[-1]:.1f})" if len(vs) > 1 else f"{vs[0]:.1f}"


def main(argv: list[str]) -> int:
    """Render BENCHMARKS.md again from a results file (``python -m bench.report RESULTS OUT``)."""
    results = from_json(json.loads(Path(argv[0]).read_text()))
    Path(argv[1]).write_text(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
