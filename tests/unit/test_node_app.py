"""The node-postgres app classifies a request's failure as the Python apps do (it is given their
phrases, ``sandbox.apps.node_env.image_env``), and its packages are keyed on the lock file and the
Node.js version (skipped without Node.js or before ``tests/sandbox/apps/setup``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from sandbox.apps import node_env
from sandbox.workloads.outcomes import classify

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not node_env.is_ready(),
    reason="Node.js or the node-postgres app's packages (tests/sandbox/apps/setup) missing",
)

# What the server and node-postgres say, as an Error's message (and one it does not classify).
MESSAGES = (
    "sorry, too many clients already",
    "remaining connection slots are reserved for non-replication superuser connections",
    "terminating connection due to administrator command",
    "terminating connection due to idle-session timeout",
    "Connection terminated unexpectedly",
    "Client has encountered a connection error and is not queryable",
    'relation "missing" does not exist',
)
SCRIPT = """
const { classify } = require(process.argv[1])
const messages = JSON.parse(process.argv[2])
const out = messages.map((m) => [false, true].map((inFlight) => classify(new Error(m), inFlight)))
process.stdout.write(JSON.stringify(out))
"""


def test_the_node_app_classifies_as_the_python_apps() -> None:
    env = {**os.environ, **node_env.image_env()}
    done = subprocess.run(
        [node_env.node(), "-e", SCRIPT, str(node_env.APP), json.dumps(MESSAGES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    got = json.loads(done.stdout)
    want = [
        [list(classify(m, in_flight=False)), list(classify(m, in_flight=True))] for m in MESSAGES
    ]
    assert got == want
    assert [g[0][0] for g in got] == ["refused"] * 2 + ["terminated"] * 4 + ["error"]


def test_the_packages_are_keyed_on_the_lock_file_and_node() -> None:
    folder = node_env.env_dir()
    assert folder.name.startswith(f"{node_env.NAME}-")
    assert (folder / "node_modules" / "pg" / "package.json").exists()
    lock = json.loads((node_env.APP_DIR / "package-lock.json").read_text())
    pinned = json.loads((node_env.APP_DIR / "package.json").read_text())["dependencies"]
    assert pinned == {"pg": lock["packages"]["node_modules/pg"]["version"]}  # exact, and alone
    assert all("resolved" not in p for p in lock["packages"].values())  # no registry named
