"""The apps' virtual environments: one per requirements file, each package pinned.

Django 5.0.1 and 5.0.2 cannot share an environment, so each app gets its own, in
``~/.cache/connbudget/apps/<name>-<hash>/`` where the hash covers the requirements file and the
Python version: a changed pin makes a new environment, and an unchanged one is reused at once.
Packages are installed with ``--no-deps`` from files that list every package (then ``pip check``),
so nothing unpinned comes in.

``python -m sandbox.apps.envs`` (what ``tests/sandbox/apps/setup`` runs) creates the missing ones,
and the node-postgres app's packages (``node``: ``sandbox.apps.node_env``), and builds the Go and
Java apps (``go``, ``java``: ``sandbox.apps.builds``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REQUIREMENTS_DIR = Path(__file__).resolve().parent / "requirements"
ENVS = ("django-asgi-5.0.1", "django-wsgi-5.0.2", "pools")
STAMP = ".connbudget-ready"


def cache_dir() -> Path:
    """The same per-user cache folder as the sandbox's binaries (``sandbox.core.cache_dir``)."""
    return Path(
        os.environ.get("CONNBUDGET_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "connbudget"
    )


def requirements(name: str) -> Path:
    return REQUIREMENTS_DIR / f"{name}.txt"


def env_dir(name: str) -> Path:
    """Where the environment for ``name`` lives (whether or not it exists yet)."""
    key = hashlib.sha256(requirements(name).read_bytes() + sys.version.encode()).hexdigest()[:12]
    return cache_dir() / "apps" / f"{name}-{key}"


def env_bin(name: str, program: str) -> str:
    """Path of ``program`` (``python``, ``uvicorn``, ``gunicorn``) in the environment."""
    return str(env_dir(name) / "bin" / program)


def is_ready(name: str) -> bool:
    return (env_dir(name) / STAMP).exists()


def ensure(name: str, say: object = print) -> Path:
    """Create the environment for ``name`` unless it is ready; return its folder."""
    folder = env_dir(name)
    if is_ready(name):
        return folder
    assert callable(say)
    say(f"apps: creating {folder.name} (pinned by {requirements(name).name})")
    started = time.monotonic()
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The base interpreter, not a virtual environment's: a venv of a venv still works, but this
    # keeps the app environments independent of .venv.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(folder)], check=True)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "install", "--no-deps", "--only-binary=:all:", "-r", str(requirements(name))],
        check=True,
    )
    subprocess.run([*pip, "check"], check=True)
    (folder / STAMP).write_text(requirements(name).read_text())
    say(f"apps: {folder.name} ready in {time.monotonic() - started:.0f}s")
    return folder


def main() -> None:
    import sandbox.apps.builds as builds  # the Go and Java apps, built from source
    from sandbox.apps import node_env  # the node-postgres app's packages (it uses this module)

    known = (*ENVS, node_env.NAME, *builds.BUILDS)
    names = sys.argv[1:] or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown app environment(s): {', '.join(unknown)} (known: {', '.join(known)})")
    for name in names:
        if name in builds.BUILDS:
            try:
                builds.ensure(name, say=lambda m: print(m, file=sys.stderr, flush=True))
            except builds.BuildError as e:
                sys.exit(f"apps: {e}")
            continue
        if name == node_env.NAME:
            node_env.ensure(say=lambda m: print(m, file=sys.stderr, flush=True))
            continue
        ensure(name, say=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"apps: environments ready in {cache_dir() / 'apps'}", file=sys.stderr)


if __name__ == "__main__":
    main()
