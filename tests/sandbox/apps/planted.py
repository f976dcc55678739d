"""The statement the ``psycopg-leak`` app (``pools``, ``POOL_KIND=leak``) leaves on each leaked
connection, with a password-like literal planted in it: what a leak report shows of that statement
must never contain ``PLANTED_SECRET``. Importable without the apps' environments."""

from __future__ import annotations

PLANTED_SECRET = "planted-S3cret-7f2c9a"
# A lookup by that literal, true of no row of an empty database: the leak's only statement.
SECRET_LOOKUP = f"SELECT count(*) FROM pg_catalog.pg_class WHERE relname = '{PLANTED_SECRET}'"
