"""Every SQL statement the operator runs: literal strings only, parameters bound by psycopg.

Nothing from the database or from a spec is ever formatted into these texts.
"""

from __future__ import annotations

from typing import Final, LiteralString

# One round trip per poll: the server's clock and limits (``h``, on every row, and on the one row
# there is when no client backend is open), then client backends grouped by database, user,
# application, address and state, with their count, the longest idle, the oldest start, and the
# pids of the group. Per-backend detail (when its state last changed, when it started) comes only
# for backends new or changed since ``since`` (the last sample's server time, minus a margin; None:
# every backend): the rest are unchanged, and the monitor still holds them from the last sample.
# It reads pg_stat_get_activity(NULL), what the pg_stat_activity view reads, and names databases
# and roles per group, not per backend: the view joins both catalogs for every row, and with a
# filter on its rows the planner joins them row by row (measured: a grouped count over the view
# with this WHERE costs twice the floor, over the function 1.3 times).
# So a poll of a quiet server costs about a grouped count, while ``policy.evidence`` still follows
# every backend poll after poll (a backend whose state_change moved was used again; one that sits
# idle is abandoned at last). A role without pg_read_all_stats (part of pg_monitor) sees other
# roles' backends with their database, user and application_name but no backend_type, state,
# address, times or statement: those are counted (a backend of a role, with a database, is a
# client or one of its parallel workers), in a group of state NULL that is never terminable,
# always in detail, and told apart by ``hidden``. The probe's own backend is left out by pid;
# other connbudget probes are left out by application_name in the policy.
BACKEND_GROUPS: Final[LiteralString] = """
SELECT h.now_s, h.db, h.max_conn, h.reserved,
       (SELECT datname FROM pg_database WHERE oid = g.datid),
       (SELECT rolname FROM pg_roles WHERE oid = g.usesysid),
       g.app, host(g.client_addr), g.state, g.n, g.hidden, g.max_idle, g.oldest,
       g.pids, g.detail_pids, g.detail_changed, g.detail_started
FROM (
    SELECT date_part('epoch', now()) AS now_s,
           current_database() AS db,
           current_setting('max_connections')::int AS max_conn,
           current_setting('superuser_reserved_connections')::int
               + coalesce(current_setting('reserved_connections', true)::int, 0) AS reserved
) h LEFT JOIN (
    SELECT datid, usesysid, coalesce(application_name, '') AS app, client_addr, state,
           count(*)::int AS n,
           count(*) FILTER (WHERE backend_type IS NULL)::int AS hidden,
           coalesce(date_part('epoch', now() - min(state_change) FILTER (WHERE state = 'idle')), 0)
               AS max_idle,
           coalesce(date_part('epoch', min(backend_start)), date_part('epoch', now())) AS oldest,
           array_agg(pid) AS pids,
           array_agg(pid) FILTER (WHERE detail) AS detail_pids,
           array_agg(coalesce(date_part('epoch', coalesce(state_change, backend_start)),
                              date_part('epoch', now()))) FILTER (WHERE detail) AS detail_changed,
           array_agg(coalesce(date_part('epoch', backend_start), date_part('epoch', now())))
               FILTER (WHERE detail) AS detail_started
    FROM (
        SELECT *,
               (%(since)s::timestamptz IS NULL OR backend_type IS NULL
                OR state_change > %(since)s::timestamptz
                OR backend_start > %(since)s::timestamptz) AS detail
        FROM pg_stat_get_activity(NULL)
        WHERE (backend_type = 'client backend' OR (backend_type IS NULL AND usesysid IS NOT NULL))
          AND pid <> pg_backend_pid()
    ) a
    GROUP BY datid, usesysid, coalesce(application_name, ''), client_addr, state
) g ON true
"""

# Terminate backends only if they are still the same backends (pid and start time) and still idle
# for at least the given seconds: between the probe and this call a backend may have become busy.
TERMINATE_IDLE: Final[LiteralString] = """
SELECT a.pid, pg_terminate_backend(a.pid)
FROM unnest(%(pids)s::int[], %(starts)s::float8[]) AS t(pid, started)
JOIN pg_stat_activity a
  ON a.pid = t.pid
 AND abs(extract(epoch FROM a.backend_start) - t.started) < 0.001
WHERE a.backend_type = 'client backend'
  AND a.state = 'idle'
  AND a.state_change <= now() - make_interval(secs => %(min_idle)s)
"""

# The last statement of a few backends (the abandoned connections of a leaking workload), by pid
# and start time: fetched only for backends the evidence asks about, never every poll for every
# backend. ``query_id`` (PostgreSQL 14+ with compute_query_id) is read through to_jsonb so the
# same text runs where the column is missing. Without pg_read_all_stats, ``query`` of another
# role's backend reads ``<insufficient privilege>``. The text never leaves the operator as it is:
# policy.fingerprint strips its literals. pg_stat_get_activity(pid) (what the pg_stat_activity view
# reads) looks up each asked backend alone instead of reading every one and keeping the few.
STATEMENTS: Final[LiteralString] = """
SELECT coalesce(json_agg(json_build_array(
           a.pid,
           extract(epoch FROM a.backend_start)::float8,
           to_jsonb(a) ->> 'query_id',
           a.query)), '[]'::json)
FROM unnest(%(pids)s::int[], %(starts)s::float8[]) AS t(pid, started)
CROSS JOIN LATERAL pg_stat_get_activity(t.pid) AS a
WHERE abs(extract(epoch FROM a.backend_start) - t.started) < 0.001
"""

# The cheapest look at the same data: the floor the probe's cost is compared to (benchmarks).
COUNT_FLOOR: Final[LiteralString] = "SELECT count(*) FROM pg_stat_activity"

SHOW_POOLS: Final[LiteralString] = "SHOW POOLS"
SHOW_CLIENTS: Final[LiteralString] = "SHOW CLIENTS"
