"""Throwaway PostgreSQL and PgBouncer instances: PostgreSQL 15 and PgBouncer from Debian's packages.

The sandbox runs PostgreSQL 15; ``start(bin_dir=...)`` runs another major from its binaries' folder
(the version matrix, ``sandbox.pgversions``).

Both run as the ``postgres`` system user when the sandbox runs as root (neither server agrees to run
as root), listen on loopback and on the pod network's host address, on free ports, with all their
files in the sandbox's state folder.

Roles created in PostgreSQL:
- ``connbudget_monitor``: ``pg_monitor`` and ``pg_signal_backend``, nothing else (what the operator
  needs);
- ``app``: owner of database ``app``, used by the workloads;
- the superuser ``postgres``, reachable only through the Unix socket in the state folder.
PgBouncer pools database ``app`` in session mode; its admin console (database ``pgbouncer``) admits
``pgbouncer_admin``, and ``connbudget_monitor`` as a stats user.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from sandbox import tls
from sandbox.procs import alive, free_port, run, spawn, stop_pid, wait_for

PG_MAJOR = 15
PG_BIN = Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin")
PGBOUNCER = Path("/usr/sbin/pgbouncer")
MONITOR_ROLE = "connbudget_monitor"
APP_ROLE = "app"
APP_DB = "app"
BOUNCER_ADMIN = "pgbouncer_admin"
DEFAULT_MAX_CONNECTIONS = 100
START_TIMEOUT = 30.0  # seconds; initdb + first start take about 3 s on 2 cores


@dataclass(frozen=True)
class DatabaseInfo:
    """Where the sandbox's PostgreSQL and PgBouncer listen and with which credentials."""

    host: str
    pg_port: int
    bouncer_port: int
    socket_dir: str
    monitor_password: str
    app_password: str
    bouncer_admin_password: str
    max_connections: int

    def dsn(self, user: str, password: str, port: int, dbname: str) -> str:
        return f"postgresql://{quote(user)}:{quote(password, safe='')}@{self.host}:{port}/{dbname}"

    @property
    def monitor_dsn(self) -> str:
        """The monitoring role's DSN (what a ConnectionBudget's Secret holds)."""
        return self.dsn(MONITOR_ROLE, self.monitor_password, self.pg_port, APP_DB)

    @property
    def app_dsn(self) -> str:
        """The app role's DSN, direct to PostgreSQL."""
        return self.dsn(APP_ROLE, self.app_password, self.pg_port, APP_DB)

    @property
    def app_pooler_dsn(self) -> str:
        """The app role's DSN through PgBouncer."""
        return self.dsn(APP_ROLE, self.app_password, self.bouncer_port, APP_DB)

    @property
    def bouncer_admin_dsn(self) -> str:
        """PgBouncer's admin console."""
        return self.dsn(BOUNCER_ADMIN, self.bouncer_admin_password, self.bouncer_port, "pgbouncer")

    @property
    def superuser_dsn(self) -> str:
        """The superuser, through the Unix socket (for test setup only)."""
        host = quote(self.socket_dir, safe="")
        return f"postgresql:///postgres?host={host}&port={self.pg_port}&user=postgres"


def ensure_packages() -> None:
    """Install PostgreSQL 15 and PgBouncer from Debian's packages when they are missing."""
    missing = []
    if not (PG_BIN / "postgres").exists():
        missing.append(f"postgresql-{PG_MAJOR}")
    if not PGBOUNCER.exists():
        missing.append("pgbouncer")
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(
            f"missing Debian packages {missing}: run `sudo apt-get install {' '.join(missing)}`"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", *missing], env=env)


def _server_user() -> str | None:
    """The user the servers run as: ``postgres`` when we are root, else ourselves."""
    return "postgres" if os.geteuid() == 0 else None


def _own(path: Path, user: str | None) -> None:
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def start(
    state: Path,
    *,
    tag: str,
    host_ip: str,
    max_connections: int,
    bin_dir: Path = PG_BIN,
    settings: Mapping[str, str] | None = None,
) -> tuple[DatabaseInfo, list[int]]:
    """Initialise and start PostgreSQL and PgBouncer under ``state``; return their info and pids.

    ``bin_dir`` holds the PostgreSQL binaries (``initdb``, ``postgres``, ``pg_isready``): Debian's
    PostgreSQL 15 unless another major is given. ``settings`` are appended to ``postgresql.conf``
    (values written as they are, quoted by the caller where PostgreSQL needs quotes).
    """
    ensure_packages()
    user = _server_user()
    root = state / "db"
    root.mkdir(mode=0o700)
    _own(root, user)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    _own(sock, user)
    info = DatabaseInfo(
        host=host_ip,
        pg_port=free_port(),
        bouncer_port=free_port(),
        socket_dir=str(sock),
        monitor_password=secrets.token_urlsafe(18),
        app_password=secrets.token_urlsafe(18),
        bouncer_admin_password=secrets.token_urlsafe(18),
        max_connections=max_connections,
    )
    listen = "127.0.0.1" if host_ip == "127.0.0.1" else f"127.0.0.1,{host_ip}"
    run(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--locale=C.UTF-8",
        ],
        user=user,
        cwd=root,
    )
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(
            f"listen_addresses = '{listen}'\nport = {info.pg_port}\n"
            f"unix_socket_directories = '{sock}'\nmax_connections = {max_connections}\n"
            "superuser_reserved_connections = 3\nfsync = off\nsynchronous_commit = off\n"
            "full_page_writes = off\nshared_buffers = 32MB\nlogging_collector = off\n"
            "log_connections = off\nlog_min_messages = warning\n"
        )
        conf.writelines(f"{k} = {v}\n" for k, v in (settings or {}).items())
    (data / "pg_hba.conf").write_text(
        "local all all trust\n"
        "host all all 127.0.0.1/32 scram-sha-256\n"
        "host all all 198.18.0.0/15 scram-sha-256\n"
    )
    log = state / "logs" / "postgres.log"
    pg = spawn([str(bin_dir / "postgres"), "-D", str(data)], tag=tag, log=log, user=user, cwd=root)
    wait_for(
        "PostgreSQL",
        lambda: (
            run(
                [
                    str(bin_dir / "pg_isready"),
                    "-q",
                    "-h",
                    str(sock),
                    "-p",
                    str(info.pg_port),
                    "-U",
                    "postgres",
                ],
                check=False,
            ).returncode
            == 0
        ),
        timeout=START_TIMEOUT,
        proc=pg,
        log=log,
    )
    _psql(
        info,
        f"""
        CREATE ROLE {MONITOR_ROLE} LOGIN PASSWORD '{info.monitor_password}';
        GRANT pg_monitor, pg_signal_backend TO {MONITOR_ROLE};
        CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{info.app_password}';
        CREATE DATABASE {APP_DB} OWNER {APP_ROLE};
    """,
    )
    bouncer = _start_pgbouncer(
        root, info, listen=listen, tag=tag, state=state, user=user, bin_dir=bin_dir
    )
    return info, [pg.pid, bouncer.pid]


def _start_pgbouncer(
    root: Path,
    info: DatabaseInfo,
    *,
    listen: str,
    tag: str,
    state: Path,
    user: str | None,
    bin_dir: Path = PG_BIN,
) -> subprocess.Popen[bytes]:
    conf = root / "pgbouncer.ini"
    users = root / "userlist.txt"
    users.write_text(
        f'"{APP_ROLE}" "{info.app_password}"\n'
        f'"{MONITOR_ROLE}" "{info.monitor_password}"\n'
        f'"{BOUNCER_ADMIN}" "{info.bouncer_admin_password}"\n'
    )
    users.chmod(0o600)
    _own(users, user)
    conf.write_text(
        "[databases]\n"
        f"{APP_DB} = host=127.0.0.1 port={info.pg_port} dbname={APP_DB}\n"
        "[pgbouncer]\n"
        f"listen_addr = {listen}\nlisten_port = {info.bouncer_port}\n"
        f"unix_socket_dir = {info.socket_dir}\n"
        f"auth_type = scram-sha-256\nauth_file = {users}\n"
        f"admin_users = {BOUNCER_ADMIN}\nstats_users = {MONITOR_ROLE}\n"
        "pool_mode = session\nmax_client_conn = 2000\ndefault_pool_size = 20\n"
        "ignore_startup_parameters = extra_float_digits\n"
        f"pidfile = {root / 'pgbouncer.pid'}\n"
    )
    _own(conf, user)
    log = state / "logs" / "pgbouncer.log"
    proc = spawn([str(PGBOUNCER), str(conf)], tag=tag, log=log, user=user, cwd=root)
    wait_for(
        "PgBouncer",
        lambda: (
            run(
                [
                    str(bin_dir / "pg_isready"),
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(info.bouncer_port),
                    "-U",
                    APP_ROLE,
                    "-d",
                    APP_DB,
                ],
                check=False,
            ).returncode
            == 0
        ),
        timeout=START_TIMEOUT,
        proc=proc,
        log=log,
    )
    return proc


STOP_GRACE = 10.0  # seconds for a fast shutdown before SIGKILL


def _state_pids(state: Path) -> dict[str, int]:
    return dict(json.loads((state / "state.json").read_text()).get("pids", {}))


def record_pid(state: Path, name: str, pid: int) -> None:
    """Write a restarted server's pid into ``state.json`` (teardown stops it by that pid)."""
    data = json.loads((state / "state.json").read_text())
    data.setdefault("pids", {})[name] = pid
    tmp = state / "state.json.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    tmp.chmod(0o600)
    tmp.replace(state / "state.json")


def stop_postgres(state: Path) -> None:
    """Stop the sandbox's PostgreSQL (fast shutdown: every client is disconnected)."""
    pid = _state_pids(state).get("postgres")
    if pid and alive(pid):
        # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client.
        stop_pid(pid, grace=STOP_GRACE, sig=signal.SIGINT)


def start_postgres(state: Path, info: DatabaseInfo) -> None:
    """Start the sandbox's PostgreSQL again, on the same port and data, and wait until it serves."""
    root = state / "db"
    log = state / "logs" / "postgres.log"
    pg = spawn(
        [str(PG_BIN / "postgres"), "-D", str(root / "data")],
        tag=str(state),
        log=log,
        user=_server_user(),
        cwd=root,
    )
    record_pid(state, "postgres", pg.pid)
    wait_for("PostgreSQL", lambda: _ready(info), timeout=START_TIMEOUT, proc=pg, log=log)


def _ready(info: DatabaseInfo) -> bool:
    argv = [str(PG_BIN / "pg_isready"), "-q", "-h", info.socket_dir, "-p", str(info.pg_port)]
    return run([*argv, "-U", "postgres"], check=False).returncode == 0


TLS_DAYS = 2  # the sandbox's certificates live as long as a test session, at most


def enable_tls(state: Path, info: DatabaseInfo) -> Path:
    """Turn TLS on in the sandbox's PostgreSQL (reload, no restart); return the CA's certificate.

    The server certificate is signed by a new self-signed CA and names the addresses clients use
    (the pod network's host address, 127.0.0.1, localhost), so ``sslmode=verify-full`` holds.
    Connections already open stay as they are; new ones may use TLS (libpq's default ``prefer``).
    """
    user = _server_user()
    folder = state / "db" / "tls"
    ca = tls.make_ca(folder, "connbudget-sandbox-pg-ca", days=TLS_DAYS)
    ca_crt = ca[0]
    crt, key = tls.sign_server_cert(
        folder,
        "server",
        ca=ca,
        common_name="postgres",
        sans=[f"IP:{info.host}", "IP:127.0.0.1", "DNS:localhost"],
        days=TLS_DAYS,
    )
    key.chmod(0o600)  # PostgreSQL refuses a key that others can read
    for path in (folder, key, crt):
        _own(path, user)
    _psql(
        info,
        f"""
        ALTER SYSTEM SET ssl_cert_file = '{crt}';
        ALTER SYSTEM SET ssl_key_file = '{key}';
        ALTER SYSTEM SET ssl = on;
        SELECT pg_reload_conf();
    """,
    )
    return ca_crt


def disable_tls(info: DatabaseInfo) -> None:
    """Turn TLS off again (open TLS connections keep their TLS)."""
    _psql(
        info,
        """
        ALTER SYSTEM RESET ssl;
        ALTER SYSTEM RESET ssl_cert_file;
        ALTER SYSTEM RESET ssl_key_file;
        SELECT pg_reload_conf();
    """,
    )


def _psql(info: DatabaseInfo, script: str) -> None:
    """Run ``script`` as the superuser; statements go through stdin, one transaction each."""
    run(
        [
            shutil.which("psql") or str(PG_BIN / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            info.socket_dir,
            "-p",
            str(info.pg_port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-f",
            "-",
        ],
        input=script,
    )
