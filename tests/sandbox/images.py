"""How the sandbox's kubelet turns a container image name into a local command.

There is no container runtime here, so an image is explicit configuration: an entrypoint, a default
command (``cmd``) and environment, as an image's config would give them. A container's ``command``
replaces the entrypoint and its ``args`` replace ``cmd``, as in Kubernetes. The tag is ignored.
A pod whose image is not mapped stays ``Pending`` with reason ``ImageNotMapped``.

Extra images come from a JSON file named by ``CONNBUDGET_SANDBOX_IMAGES``:
``{"registry/name": {"entrypoint": [...], "cmd": [...], "env": {...}}}``.

An image can also be a real one: a root filesystem unpacked from a built image (see
``sandbox.image_build``) with its config (entrypoint, command, environment, user, working
directory). ``load_image`` puts it into a running sandbox's image store, as ``kind load``
does for a kind node; the kubelet looks there first, and runs such a container chrooted into the
image's root filesystem (``sandbox.container``) instead of as a command on this machine.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NotRequired, TypedDict
from urllib.parse import quote

from sandbox.apps import builds, envs, node_env

TESTS_DIR = Path(__file__).resolve().parent.parent
OPERATOR_IMAGE = "ghcr.io/connbudget/connbudget"


STORE = "images"  # the image store's folder in a sandbox's state folder


class Image(TypedDict):
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    # Only for an image with a root filesystem: where it is unpacked, the config's User (``uid``,
    # ``uid:gid`` or names) and WorkingDir.
    rootfs: NotRequired[str]
    user: NotRequired[str]
    workdir: NotRequired[str]


def rootfs_image(rootfs: Path, config: dict[str, Any]) -> Image:
    """An image with a root filesystem, from its OCI config (``Entrypoint``, ``Cmd``, ``Env``,
    ``User``, ``WorkingDir``)."""
    env = dict(item.split("=", 1) for item in config.get("Env") or [])
    return Image(
        entrypoint=list(config.get("Entrypoint") or []),
        cmd=list(config.get("Cmd") or []),
        env=env,
        rootfs=str(rootfs),
        user=str(config.get("User") or ""),
        workdir=str(config.get("WorkingDir") or "/"),
    )


def _stored(state_dir: Path, name: str) -> Path:
    return state_dir / STORE / f"{quote(image_key(name), safe='')}.json"


def load_image(state_dir: Path, name: str, image: Image) -> None:
    """Put ``image`` into a sandbox's image store under ``name`` (tag ignored); pods started from
    now on run it, whatever the sandbox's own mapping says."""
    path = _stored(state_dir, name)
    path.parent.mkdir(exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(image))
    partial.rename(path)


def unload_image(state_dir: Path, name: str) -> None:
    """Remove ``name`` from a sandbox's image store (back to the sandbox's own mapping)."""
    _stored(state_dir, name).unlink(missing_ok=True)


def stored_image(state_dir: Path, name: str) -> Image | None:
    """The image loaded into a sandbox's store under ``name``, if any."""
    try:
        loaded: Image = json.loads(_stored(state_dir, name).read_text())
    except FileNotFoundError:
        return None
    return loaded


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
        # node-postgres (pg 8, ``sandbox.apps.node_env``) under Node's http module: ``NODE_MODE``
        # pool (``POOL_MAX`` connections, 'error' listened for), leak or leak-listen.
        "sandbox.local/node-pg-app": Image(
            entrypoint=[node_env.node(), str(node_env.APP)],
            cmd=[],
            env={"APP_PORT": "8000", "NODE_MODE": "pool", "POOL_MAX": "2"} | node_env.image_env(),
        ),
        # pgx v5 (``GO_MODE`` pgxpool, sql or leak) and HikariCP 5 with pgjdbc (``JAVA_MODE``
        # hikari or leak), no pre-ping; built from source by ``sandbox.apps.builds``.
        "sandbox.local/go-pg-app": Image(
            entrypoint=[str(builds.go_binary())],
            cmd=[],
            env={"APP_PORT": "8000", "GO_MODE": "pgxpool", "PGX_MAX_CONNS": "2"},
        ),
        "sandbox.local/java-hikari-app": Image(
            entrypoint=builds.java_command(),
            cmd=[],
            env={"APP_PORT": "8000", "JAVA_MODE": "hikari", "HIKARI_MAXIMUM_POOL_SIZE": "2"},
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
