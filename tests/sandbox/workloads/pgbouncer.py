"""PgBouncer as a pod: writes a config from the environment and runs Debian's pgbouncer.

Settings (environment):
- ``PG_HOST``, ``PG_PORT``, ``PG_DB``: the PostgreSQL database to pool;
- ``USERLIST``: the auth file's lines (``"user" "password"``), from a Secret;
- ``ADMIN_USERS``, ``STATS_USERS``: who may use the admin console;
- ``POOL_SIZE``: server connections per user and database (default 5);
- ``LISTEN_PORT``: default 6432 (pods have their own address in netns mode).

PgBouncer refuses to run as root, so as root it runs as the ``postgres`` user.
"""

from __future__ import annotations

import os
import pwd
import sys
import tempfile
from pathlib import Path

PGBOUNCER = "/usr/sbin/pgbouncer"


def main() -> None:
    env = os.environ
    missing = [k for k in ("PG_HOST", "PG_PORT", "PG_DB", "USERLIST") if not env.get(k)]
    if missing:
        sys.exit(f"pgbouncer pod: set {', '.join(missing)}")
    folder = Path(tempfile.mkdtemp(prefix="pgbouncer-pod-"))
    users = folder / "userlist.txt"
    users.write_text(env["USERLIST"].strip() + "\n")
    users.chmod(0o600)
    conf = folder / "pgbouncer.ini"
    conf.write_text(
        "[databases]\n"
        f"{env['PG_DB']} = host={env['PG_HOST']} port={env['PG_PORT']} dbname={env['PG_DB']}\n"
        "[pgbouncer]\n"
        f"listen_addr = 0.0.0.0\nlisten_port = {env.get('LISTEN_PORT', '6432')}\n"
        "unix_socket_dir =\n"
        f"auth_type = scram-sha-256\nauth_file = {users}\n"
        f"admin_users = {env.get('ADMIN_USERS', '')}\nstats_users = {env.get('STATS_USERS', '')}\n"
        f"pool_mode = session\nmax_client_conn = 1000\n"
        f"default_pool_size = {env.get('POOL_SIZE', '5')}\n"
        "ignore_startup_parameters = extra_float_digits\n"
    )
    argv = [PGBOUNCER, str(conf)]
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for p in (folder, users, conf):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    print(
        f"pgbouncer pod: pooling {env['PG_DB']} on port {env.get('LISTEN_PORT', '6432')}",
        flush=True,
    )
    os.execv(PGBOUNCER, argv)  # noqa: S606 (replace this process: signals reach pgbouncer)


if __name__ == "__main__":
    main()
