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
