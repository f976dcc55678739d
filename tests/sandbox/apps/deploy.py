"""Deploy a real app with its HTTP driver: one Deployment whose pods have two containers.

``app`` runs one of the app images (``sandbox.images.app_images``), ``driver`` runs
``sandbox.local/http-driver`` and reaches the app at ``127.0.0.1`` (the containers share the pod's
network namespace). Both get ``DATABASE_URL`` from a Secret and ``PGAPPNAME`` (the pod's name)
like ``Workloads.deploy``'s pods; the driver ignores them.

The kinds, with the settings they were measured with:

- ``leak``: ``sandbox.local/django-asgi-leak`` driven at ``LEAK_RATE`` abandoned requests per second
  (each leaks one connection under Django 5.0.1's ASGI handler); with ``app_env=SQLCOMMENTER`` each
  query carries sqlcommenter's tags (``sandbox.apps.django_site.sqlcommenter``);
- ``psycopg-leak``: the psycopg app without its pool (``POOL_KIND=leak``), driven at ``DRIVE_RATE``
  requests per second (``rate_settings``), each leaking one connection whose last statement is
  ``sandbox.apps.planted.SECRET_LOOKUP``, untagged;
- ``django``: ``sandbox.local/django-wsgi-pool`` (gunicorn, ``WEB_CONCURRENCY`` workers with a
  persistent connection each) driven by as many lanes;
- ``psycopg`` / ``sqlalchemy``: the pool apps (``POOL_SIZE`` connections) driven by as many lanes;
- ``node-pool``: ``sandbox.local/node-pg-app``'s ``pg.Pool`` (``POOL_MAX`` connections) driven by
  as many lanes; ``node-leak`` / ``node-leak-listen``: its leak (a ``pg.Client`` per request, never
  ended; without / with an ``error`` listener), driven at ``DRIVE_RATE`` (``rate_settings``).
- ``go-pgxpool`` / ``go-sql``: ``sandbox.local/go-pg-app``'s pools (pgxpool, ``PGX_MAX_CONNS``;
  database/sql, ``SQL_MAX_OPEN_CONNS`` with ``SQL_MAX_IDLE_CONNS`` kept idle), and ``java-hikari``:
  ``sandbox.local/java-hikari-app``'s HikariCP (``HIKARI_MAXIMUM_POOL_SIZE``, with
  ``HIKARI_MINIMUM_IDLE`` kept idle), each of as many connections as lanes; ``go-leak`` /
  ``java-leak``: their leaks (a connection per request, never closed) driven at ``DRIVE_RATE``.

Each pod's log is read with ``Sandbox.pod_log(ns, pod, "app")`` (or ``"driver"``) and counted
with ``sandbox.workloads.outcomes.count_outcomes``.
"""

from __future__ import annotations

from typing import Any

from kubernetes.client.rest import ApiException

from sandbox.fixtures import Workloads
from sandbox.procs import free_port

APP_IMAGES = {
    "leak": "sandbox.local/django-asgi-leak:5.0.1",
    "django": "sandbox.local/django-wsgi-pool:5.0.2",
    "psycopg": "sandbox.local/psycopg-pool-app:3.2.1",
    "psycopg-leak": "sandbox.local/psycopg-pool-app:3.2.1",
    "sqlalchemy": "sandbox.local/sqlalchemy-app:2.0.25",
    "node-pool": "sandbox.local/node-pg-app:8.23.1",
    "node-leak": "sandbox.local/node-pg-app:8.23.1",
    "node-leak-listen": "sandbox.local/node-pg-app:8.23.1",
}
APP_IMAGES |= dict.fromkeys(("go-pgxpool", "go-sql", "go-leak"), "sandbox.local/go-pg-app:5.13.0")
APP_IMAGES |= dict.fromkeys(("java-hikari", "java-leak"), "sandbox.local/java-hikari-app:5.1.0")
# What makes a kind of an image shared with another (the container's env overrides the image's).
KIND_ENV = {"psycopg-leak": {"POOL_KIND": "leak"}}
KIND_ENV |= {f"node-{mode}": {"NODE_MODE": mode} for mode in ("pool", "leak", "leak-listen")}
KIND_ENV |= {f"go-{mode}": {"GO_MODE": mode} for mode in ("pgxpool", "sql", "leak")}
KIND_ENV |= {f"java-{mode}": {"JAVA_MODE": mode} for mode in ("hikari", "leak")}
# The other apps' pool size, which follows the driver's lanes as ``POOL_SIZE`` does.
POOL_SIZE_ENV = {
    "go-pgxpool": "PGX_MAX_CONNS",
    "go-sql": "SQL_MAX_OPEN_CONNS",
    "java-hikari": "HIKARI_MAXIMUM_POOL_SIZE",
    "node-pool": "POOL_MAX",
}
DRIVER_IMAGE = "sandbox.local/http-driver:dev"
# ``app_env`` of a ``leak`` app whose queries carry sqlcommenter's tags.
SQLCOMMENTER = {"SQLCOMMENTER": "1"}


def leak_settings(rate: float, seconds: float, **extra: str) -> dict[str, str]:
    """Driver settings for ``rate`` leaked connections per second during ``seconds``."""
    return {"LEAK_RATE": str(rate), "DRIVE_SECONDS": str(seconds), **extra}


def rate_settings(rate: float, seconds: float, **extra: str) -> dict[str, str]:
    """Driver settings for ``rate`` requests per second (open loop) during ``seconds``."""
    return {"DRIVE_RATE": str(rate), "DRIVE_SECONDS": str(seconds), **extra}


def pool_settings(
    connections: int, gap: tuple[float, float], seconds: float, **extra: str
) -> dict[str, str]:
    """Driver settings for a pool of ``connections`` reused every ``gap`` seconds."""
    return {
        "DRIVE_LANES": str(connections),
        "REUSE_GAP_MIN": str(gap[0]),
        "REUSE_GAP_MAX": str(gap[1]),
        "DRIVE_SECONDS": str(seconds),
        **extra,
    }


def deploy_app(
    workloads: Workloads,
    namespace: str,
    name: str,
    *,
    kind: str,
    driver_env: dict[str, str],
    app_env: dict[str, str] | None = None,
    replicas: int = 1,
    labels: dict[str, str] | None = None,
    wait: bool = True,
) -> dict[str, Any]:
    """Create the Deployment ``name`` of app ``kind`` (see ``APP_IMAGES``) with its driver.

    In loopback network mode the pods share 127.0.0.1, so the Deployment gets a free port of its
    own and should have one replica.
    """
    db = workloads.sandbox.db
    secret = f"{name}-db"
    body = {"metadata": {"name": secret}, "stringData": {"url": db.app_dsn}}
    try:
        workloads.core.create_namespaced_secret(namespace, body)
    except ApiException as e:
        if e.status != 409:
            raise
        workloads.core.replace_namespaced_secret(secret, namespace, body)
    port = "8000" if workloads.sandbox.network.mode == "netns" else str(free_port())
    common = [
        {"name": "PGAPPNAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": secret, "key": "url"}}},
    ]

    def env(extra: dict[str, str]) -> list[dict[str, Any]]:
        return common + [{"name": k, "value": v} for k, v in extra.items()]

    app_vars = {"APP_PORT": port, **KIND_ENV.get(kind, {}), **(app_env or {})}
    driver_vars = {"TARGET_PORT": port, **driver_env}
    if kind in ("django", "psycopg", "sqlalchemy") and "DRIVE_LANES" in driver_vars:
        # One lane per connection: gunicorn workers or pool size follow the lanes.
        size = "WEB_CONCURRENCY" if kind == "django" else "POOL_SIZE"
        app_vars.setdefault(size, driver_vars["DRIVE_LANES"])
    if kind in POOL_SIZE_ENV and "DRIVE_LANES" in driver_vars:
        app_vars.setdefault(POOL_SIZE_ENV[kind], driver_vars["DRIVE_LANES"])
    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, "kind": kind, **(labels or {})}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [
                        {"name": "app", "image": APP_IMAGES[kind], "env": env(app_vars)},
                        {"name": "driver", "image": DRIVER_IMAGE, "env": env(driver_vars)},
                    ],
                },
            },
        },
    }
    workloads.apps.create_namespaced_deployment(namespace, deployment)
    if wait:
        workloads.wait_available(namespace, name, replicas)
    return deployment
