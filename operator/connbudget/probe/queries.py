"""Every SQL statement the operator runs: literal strings only, parameters bound by psycopg.

Nothing from the database or from a spec is ever formatted into these texts.
"""

from __future__ import annotations

from typing import Final, LiteralString

# One round trip per poll, one row: the server's clock and limits, the pid of every client backend,
# and each backend's detail (its database, user, application, address, state, whether it is hidden,
# when its state last changed and when it started) only for backends new or changed since ``since``
# (the last sample's server time, minus a margin; None: every backend). The rest are unchanged: the
# monitor still holds them, with the group each was in, and groups them itself (``probe.backends``),
# so the server does not sort or hash a thousand rows by five keys every poll (measured at 1,000
# idle backends: grouping alone cost 1.4 times the floor, this query 1.2 times). One aggregate
# carries the detail (json: one filter and one call per row, where an array per field cost one
# each). Names are read per poll for the databases and roles in use (a role may be renamed while
# its backends live), never per backend. It reads pg_stat_get_activity(NULL), what the
# pg_stat_activity view reads, without the view's joins. A backend comes in detail whatever its
# times when one of them is NULL (track_activities off, a backend still starting, a hidden one):
# a backend without detail is then always one whose state and group have not changed since the
# last sample. A role without pg_read_all_stats (part of pg_monitor) sees other roles' backends
# with their database, user and application_name but no backend_type, state, address, times or
# statement: those are counted (a backend of a role, with a database, is a client or one of its
# parallel workers), in a group of state NULL that is never terminable, always in detail, and told
# apart by ``hidden``. The probe's own backend is left out by pid; other connbudget probes are left
# out by application_name in the policy. Oids travel as int8 (json has no oid), times as epoch
# seconds (the probe's connection sets extra_float_digits=3: every digit of a float8 is sent).
BACKEND_SAMPLE: Final[LiteralString] = """
SELECT date_part('epoch', now()),
       current_database(),
       current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int
           + coalesce(current_setting('reserved_connections', true)::int, 0),
       g.pids,
       g.detail,
       (SELECT json_agg(json_build_array(oid::int8, datname))
        FROM pg_database WHERE oid = ANY(g.datids)),
       (SELECT json_agg(json_build_array(oid::int8, rolname))
        FROM pg_roles WHERE oid = ANY(g.roles))
FROM (
    SELECT array_agg(pid) AS pids,
           array_agg(DISTINCT datid) AS datids,
           array_agg(DISTINCT usesysid) AS roles,
           json_agg(json_build_array(
               pid, datid::int8, usesysid::int8, coalesce(application_name, ''),
               host(client_addr), state, backend_type IS NULL,
               coalesce(date_part('epoch', coalesce(state_change, backend_start)),
                        date_part('epoch', now())),
               date_part('epoch', backend_start))) FILTER (WHERE detail) AS detail
    FROM (
        SELECT pid, datid, usesysid, application_name, client_addr, state, backend_type,
               state_change, backend_start,
               (%(since)s::timestamptz IS NULL OR backend_type IS NULL
                OR state_change IS NULL OR backend_start IS NULL
                OR state_change > %(since)s::timestamptz
                OR backend_start > %(since)s::timestamptz) AS detail
        FROM pg_stat_get_activity(NULL)
        WHERE (backend_type = 'client backend' OR (backend_type IS NULL AND usesysid IS NOT NULL))
          AND pid <> pg_backend_pid()
    ) a
) g
"""

# The monitoring connection's first statement, once: it reads the backends' status before any
# other statement does. Each statement that reads it copies every backend's slot (at 1,000
# connections about 2 MB, mostly the 1 KB of each one's last statement) into memory freed when
# it ends; in a backend whose first such read came with the sample's own catalog lookups, glibc
# gave those pages back to the kernel after every poll and faulted them in again at the next
# (measured on PostgreSQL 15 at 1,000 backends: about 360 page faults and 0.9 ms of the server's
# CPU per poll, a third of the floor). Read first on its own, the copy stays in the backend's
# heap and every later poll reuses it: no fault.
WARM_UP: Final[LiteralString] = "SELECT count(*) FROM pg_stat_get_activity(NULL)"


# Terminate each chosen backend only if it is still what the probe saw: the same backend (pid and
# start time), still idle, and not used since (its state_change no later than the one the probe
# read, 1 ms for the floats' rounding). Each backend is checked against its own state_change:
# against the batch's smallest idle age, a backend used again after the probe and idle again for
# that long was terminated. A backend the monitoring role may not signal is left alone: for one,
# pg_terminate_backend raises an ERROR that ends the whole statement, and nothing is terminated.
# PostgreSQL's rule (signalfuncs.c, pg_signal_backend): a superuser may signal any backend; another
# role only a backend whose role is not a superuser, and whose role or pg_signal_backend it has the
# privileges of (pg_has_role USAGE: has_privs_of_role); a backend with no role is a superuser's.
# One row per backend still idle and unchanged: its pid, whether the role may signal it, and
# whether it was signalled (false for one that ended on its own meanwhile).
TERMINATE_IDLE: Final[LiteralString] = """
SELECT c.pid, c.permitted, CASE WHEN c.permitted THEN pg_terminate_backend(c.pid) ELSE false END
FROM (
    SELECT a.pid,
           coalesce((SELECT rolsuper FROM pg_roles WHERE rolname = current_user), false)
           OR (a.usesysid IS NOT NULL
               AND NOT coalesce(r.rolsuper, false)
               AND (pg_has_role('pg_signal_backend', 'USAGE')
                    OR (r.oid IS NOT NULL AND pg_has_role(r.oid, 'USAGE')))) AS permitted
    FROM unnest(%(pids)s::int[], %(starts)s::float8[], %(changes)s::float8[])
             AS t(pid, started, changed)
    JOIN pg_stat_activity a
      ON a.pid = t.pid
     AND abs(extract(epoch FROM a.backend_start) - t.started) < 0.001
    LEFT JOIN pg_roles r ON r.oid = a.usesysid
    WHERE a.backend_type = 'client backend'
      AND a.state = 'idle'
      AND date_part('epoch', a.state_change) <= t.changed + 0.001
) c
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
