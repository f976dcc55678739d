"""How the sandbox's kubelet turns a container image name into a local command.

There is no container runtime here, so an image is explicit configuration: an entrypoint, a default
command (``cmd``) and environment, as an image's config would give them. A container's ``command``
replaces the entrypoint and its ``args`` replace ``cmd``, as in Kubernetes. The tag is ignored.
A pod whose image is not mapped stays ``Pending`` with reason ``ImageNotMapped``.

Extra images come from a JSON file named by ``CONNBUDGET_SANDBOX_IMAGES``:
``{"registry/name": {"entrypoint": [...], "cmd": [...], "env": {...}}}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TypedDict

from sandbox.apps import envs

TESTS_DIR = Path(__file__).resolve().parent.parent
OPERATOR_IMAGE = "ghcr.io/connbudget/connbudget"


class Image(TypedDict):
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]


def _python_module(module: str) -> Image:
    return Image(
        entrypoint=[sys.executable, "-u", "-m", module],
        cmd=[],
        env={"PYTHONPATH": str(TESTS_DIR), "PYTHONUNBUFFERED": "1"},
    )


def _app(env: str, program: str, cmd: list[str], *, django: bool, **env_vars: str) -> Image:
    """A real app from one of ``sandbox.apps.envs``' pinned environments, on ``$(APP_PORT)``;
    a Django app migrates its database first (``sandbox.apps.django_site.start``)."""
    return Image(
        entrypoint=[envs.env_bin(env, "python"), "-m", "sandbox.apps.django_site.start", program]
        if django
        else [envs.env_bin(env, program)],
        cmd=cmd,
        env={"PYTHONPATH": str(TESTS_DIR), "PYTHONUNBUFFERED": "1", "APP_PORT": "8000"} | env_vars,
    )


def app_images() -> dict[str, Image]:
    """The real apps (``sandbox.apps``) and their HTTP driver; ``tests/sandbox/apps/setup``
    installs their environments. ``WEB_CONCURRENCY`` is the number of server processes."""
    everywhere = "0.0.0.0"  # noqa: S104 (the pod's own network namespace)
    bind = f"{everywhere}:$(APP_PORT)"
    pool_app = ["sandbox.apps.pools:application", "--bind", bind, "--worker-class", "gthread"]
    pool_app += ["--workers", "1", "--threads", "$(POOL_THREADS)"]
    return {
        # Django 5.0.1, uvicorn (ASGI), connections closed at the end of each request
        # (CONN_MAX_AGE 0, as Django asks under ASGI): leaks when a client hangs up (#35059).
        "sandbox.local/django-asgi-leak": _app(
            "django-asgi-5.0.1",
            "uvicorn",
            [
                *["sandbox.apps.django_site.asgi:application", "--host", everywhere],
                *["--port", "$(APP_PORT)", "--no-access-log"],
            ],
            django=True,
            CONN_MAX_AGE="0",
            WEB_CONCURRENCY="1",
            # Collections rare enough that a leaked connection lives until PostgreSQL is full, as
            # in a large app (see django_site/settings.py); empty for CPython's defaults.
            GC_THRESHOLD="1000000,10,10",
        ),
        # Django 5.0.2, gunicorn sync workers, each with one persistent connection, no health check.
        "sandbox.local/django-wsgi-pool": _app(
            "django-wsgi-5.0.2",
            "gunicorn",
            ["sandbox.apps.django_site.wsgi:application", "--bind", bind, "--worker-class", "sync"],
            django=True,
            CONN_MAX_AGE="600",
            CONN_HEALTH_CHECKS="0",
            WEB_CONCURRENCY="2",
        ),
        "sandbox.local/psycopg-pool-app": _app(
            "pools",
            "gunicorn",
            pool_app,
            django=False,
            POOL_KIND="psycopg",
            POOL_SIZE="2",
            POOL_THREADS="4",
        ),
        "sandbox.local/sqlalchemy-app": _app(
            "pools",
            "gunicorn",
            pool_app,
            django=False,
            POOL_KIND="sqlalchemy",
            POOL_SIZE="2",
            POOL_THREADS="4",
        ),
        "sandbox.local/http-driver": _python_module("sandbox.workloads.driver"),
    }


def default_images() -> dict[str, Image]:
    """The images every sandbox knows."""
    return {
        "sandbox.local/leaky-app": _python_module("sandbox.workloads.leaky"),
        "sandbox.local/steady-app": _python_module("sandbox.workloads.steady"),
        "sandbox.local/pgbouncer": _python_module("sandbox.workloads.pgbouncer"),
        "sandbox.local/pause": Image(entrypoint=["sleep", "infinity"], cmd=[], env={}),
        # The operator's published image is the package installed in this virtual environment
        # (as the Dockerfile installs it): the Deployment from manifests/ or the Helm chart runs
        # it unchanged, with the image's entrypoint `connbudget` and default command `run`.
        OPERATOR_IMAGE: Image(
            entrypoint=[sys.executable, "-m", "connbudget"],
            cmd=["run"],
            env={"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"},
        ),
        **app_images(),
    }


def load_images() -> dict[str, Image]:
    """The default images plus those in ``CONNBUDGET_SANDBOX_IMAGES``, if set."""
    images = default_images()
    extra = os.environ.get("CONNBUDGET_SANDBOX_IMAGES")
    if extra:
        for name, spec in json.loads(Path(extra).read_text()).items():
            images[name] = Image(
                entrypoint=list(spec.get("entrypoint", [])),
                cmd=list(spec.get("cmd", [])),
                env=dict(spec.get("env", {})),
            )
    return images


def image_key(image: str) -> str:
    """Strip the tag or digest: ``sandbox.local/leaky-app:v1`` → ``sandbox.local/leaky-app``."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name
