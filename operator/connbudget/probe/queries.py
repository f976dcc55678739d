"""Every SQL statement the operator runs: literal strings only, parameters bound by psycopg.

Nothing from the database or from a spec is ever formatted into these texts.
"""

from __future__ import annotations

from typing import Final, LiteralString

# A role without pg_read_all_stats (part of pg_monitor) sees other roles' backends with their
# database, user and application_name but no backend_type, state, address, times or statement:
# those are counted (a backend of a role, with a database, is a client or one of its parallel
# workers), in a group of state NULL that is never terminable, and told apart by ``hidden``.
# One round trip per poll: the server's clock, its limits, and client backends grouped by
# database, user, application, address and state. Every group carries its backends (pid, seconds
# since state_change, start), longest in its state first: idle ones are termination candidates,
# and their state_change, followed poll after poll, tells a reused connection from an abandoned
# one (policy.evidence). The probe's own backend is left
# out by pid; other connbudget probes are left out by application_name in the policy.
BACKENDS: Final[LiteralString] = """
WITH b AS (
    SELECT pid,
           datname,
           usename,
           coalesce(application_name, '') AS app,
           host(client_addr) AS addr,
           state,
           coalesce(extract(epoch FROM now() - coalesce(state_change, backend_start)), 0)::float8
               AS in_state_s,
           coalesce(extract(epoch FROM backend_start), extract(epoch FROM now()))::float8
               AS started,
           backend_type IS NULL AS hidden
    FROM pg_stat_activity
    WHERE (backend_type = 'client backend' OR (backend_type IS NULL AND usesysid IS NOT NULL))
      AND pid <> pg_backend_pid()
), g AS (
    SELECT datname, usename, app, addr, state,
           count(*)::int AS n,
           CASE WHEN state = 'idle' THEN max(in_state_s) ELSE 0 END AS max_idle,
           min(started) AS oldest,
           json_agg(json_build_array(pid, in_state_s, started) ORDER BY in_state_s DESC)
               AS backends
    FROM b
    GROUP BY datname, usename, app, addr, state
)
SELECT extract(epoch FROM now())::float8,
       current_database(),
       current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int
           + coalesce(current_setting('reserved_connections', true)::int, 0),
       coalesce((SELECT json_agg(json_build_array(datname, usename, app, addr, state, n,
                                                  max_idle, oldest, backends)) FROM g), '[]'::json),
       (SELECT count(*) FROM b WHERE hidden)::int
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
