"""PostgreSQL and PgBouncer probes (psycopg 3, async): the only layer that talks to databases."""
