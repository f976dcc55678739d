"""The node-postgres app's packages (``node/``): ``npm ci`` from its lock file, cached.

``node/package.json`` names one dependency, ``pg``, at an exact version, and
``node/package-lock.json`` pins it and everything it brings (versions and integrity hashes, no
registry URL: ``node/.npmrc``). ``npm ci`` installs exactly that, with no install scripts, into
``~/.cache/connbudget/apps/node-<hash>/node_modules``, where the hash covers the lock file and
``node --version``: a changed pin or Node.js makes a new folder, an unchanged one is reused at once
(a stamp file says the install finished). The app itself runs from the checkout (``node/app.js``),
finding ``pg`` through ``NODE_PATH``.

``envs.main`` (``tests/sandbox/apps/setup``) calls ``ensure``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from sandbox.apps import envs
from sandbox.workloads.outcomes import REFUSED_PHRASES, TERMINATED_PHRASES

NAME = "node"
APP_DIR = Path(__file__).resolve().parent / "node"
APP = APP_DIR / "app.js"
FILES = ("package.json", "package-lock.json", ".npmrc")  # what npm ci reads
NPM_TIMEOUT = 600.0  # seconds; a cold install takes a few


@functools.cache
def node() -> str:
    """The ``node`` program (a bare name, failing when started, if there is none)."""
    return shutil.which("node") or "node"


@functools.cache
def node_version() -> str:
    """``node --version`` (``v20.20.2``), or empty without Node.js."""
    try:
        done = subprocess.run(
            [node(), "--version"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def env_dir() -> Path:
    """Where the packages for this lock file and Node.js live (whether or not they exist yet)."""
    lock = (APP_DIR / "package-lock.json").read_bytes()
    key = hashlib.sha256(lock + node_version().encode()).hexdigest()[:12]
    return envs.cache_dir() / "apps" / f"{NAME}-{key}"


def is_ready() -> bool:
    return (env_dir() / envs.STAMP).exists()


def ensure(say: Callable[[str], object] = print) -> Path:
    """Install the locked packages unless they are ready; return their folder."""
    folder = env_dir()
    if is_ready():
        return folder
    if not node_version() or shutil.which("npm") is None:
        raise RuntimeError("Node.js and npm are needed for the node-postgres app (Node.js 20+)")
    say(f"apps: creating {folder.name} (npm ci, pinned by node/package-lock.json)")
    started = time.monotonic()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in FILES:
        shutil.copy2(APP_DIR / name, folder / name)
    subprocess.run(
        ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=folder,
        check=True,
        timeout=NPM_TIMEOUT,
    )
    (folder / envs.STAMP).write_text(f"{node_version()}\n")
    say(f"apps: {folder.name} ready in {time.monotonic() - started:.0f}s")
    return folder


def image_env() -> dict[str, str]:
    """The app's environment in its image: where ``pg`` is, and the phrases that classify an
    error (``sandbox.workloads.outcomes``), so both ecosystems count outcomes alike."""
    phrases = {"refused": list(REFUSED_PHRASES), "terminated": list(TERMINATED_PHRASES)}
    return {
        "NODE_PATH": str(env_dir() / "node_modules"),
        "NODE_ENV": "production",
        "OUTCOME_PHRASES": json.dumps(phrases),
    }
