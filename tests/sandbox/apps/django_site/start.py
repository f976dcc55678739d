"""Prepare the database, then become the web server: ``python -m sandbox.apps.django_site.start
SERVER ARGS...`` (``uvicorn ...`` or ``gunicorn ...``, from the same environment's ``bin/``).

``migrate`` runs at every start, under a PostgreSQL advisory lock so that pods starting together
take turns (the second finds nothing to do). The connection is closed before the server starts.
"""

from __future__ import annotations

import os
import sys
import time

MIGRATION_LOCK = 0x636F6E6E  # any constant shared by every pod of every Django app here


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m sandbox.apps.django_site.start SERVER [ARGS...]")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sandbox.apps.django_site.settings")
    import django  # type: ignore[import-not-found]
    from django.core.management import call_command  # type: ignore[import-not-found]
    from django.db import connection  # type: ignore[import-not-found]

    from sandbox.workloads.common import log

    django.setup()
    started = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", [MIGRATION_LOCK])
        try:
            call_command("migrate", interactive=False, verbosity=0)
        finally:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [MIGRATION_LOCK])
    connection.close()
    log("migrated", django=django.get_version(), seconds=round(time.monotonic() - started, 2))
    server = os.path.join(os.path.dirname(sys.executable), sys.argv[1])
    os.execv(server, [server, *sys.argv[2:]])  # noqa: S606 (signals reach the server itself)


if __name__ == "__main__":
    main()
