"""``connbudget leaks`` against the sandbox's API server, as a command and as a kubectl plugin.

No operator and no database: the status is written the way the operator writes it (its own
``report.status`` and ``policy.fingerprint``), so what is tested is the listing, the kubeconfig and
its context's namespace, kubectl's plugin mechanism, and a user without RBAC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from connbudget.policy import fingerprint
from connbudget.policy.culprits import LeakShape
from connbudget.report import status
from e2e.conftest import GROUP, PLURAL, ROOT, VERSION, Budgets
from sandbox.core import Sandbox

pytestmark = pytest.mark.sandbox

SPEC = {
    "database": {"secretRef": {"name": "pg-monitor"}},
    "budget": {"maxConnections": 80},
    "selector": {"matchLabels": {"tier": "shop"}},
}
PLANTED = "s3cret-Planted-77"
QUERY = (
    f'SELECT COUNT(*) AS "__count" FROM "auth_user" WHERE "token" = \'{PLANTED}\' '
    "/*controller='sync',framework='django%%3A5.0.1',route='sync/'*/"
)


def leaking_status() -> dict[str, Any]:
    shown = fingerprint.statement_of(QUERY, None)
    assert shown is not None
    shape = LeakShape(
        fingerprint=shown.fingerprint,
        statement=shown.text,
        tags=shown.tags,
        count=41,
        share=0.87,
        first_seen=1_796_300_000.0,
        revision="web-7457d5dc96",
    )
    web = {
        "owner": "Deployment/web",
        "pods": 3,
        "connections": 52,
        "class": "Leaking",
        "leakRatePerMinute": 5.2,
        "abandoned": 47,
        "leaks": status.leak_shapes([shape]),
        "hint": "upgrade Django",
    }
    api = {"owner": "Deployment/api", "pods": 2, "connections": 8, "class": "Pooling"}
    return {
        "phase": "WithinBudget",
        "usage": {"connections": 60, "budget": 80, "byOwner": [web, api]},
    }


def env(**extra: str) -> dict[str, str]:
    # This checkout's package, whichever one the interpreter has installed.
    path = os.pathsep.join(p for p in (str(ROOT / "operator"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def leaks(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connbudget.cli", "leaks", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(**extra),
        check=False,
    )


def test_a_leaking_workload_is_listed_by_namespace_by_context_and_through_kubectl(
    sandbox: Sandbox, budgets: Budgets, namespace: str, tmp_path: Path
) -> None:
    budgets.create("app-db", SPEC)
    budgets.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "app-db", {"status": leaking_status()}
    )

    res = leaks("-n", namespace, "--kubeconfig", sandbox.kubeconfig)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["BUDGET", "OWNER", "RATE/MIN"]
    assert lines[1].split()[:4] == ["app-db", "Deployment/web", "5.2", "47"]
    assert "route=sync/ controller=sync framework=django:5.0.1" in lines[1]
    assert lines[2].strip() == "hint: upgrade Django"
    assert "Deployment/api" not in res.stdout
    assert PLANTED not in res.stdout

    res = leaks("-A", "--json", "--all-owners", "--kubeconfig", sandbox.kubeconfig)
    assert res.returncode == 0, res.stderr
    mine = [o for o in json.loads(res.stdout) if o["namespace"] == namespace]
    assert [(o["owner"], o["class"]) for o in mine] == [
        ("Deployment/web", "Leaking"),
        ("Deployment/api", "Pooling"),
    ]
    assert mine[0]["leaks"][0]["statement"].endswith('WHERE "token" = ?')

    # No -n: the kubeconfig context's namespace, as kubectl does.
    config = tmp_path / "kubeconfig"
    config.write_text(Path(sandbox.kubeconfig).read_text())
    # (On a copy: the sandbox's own kubeconfig is never changed.)
    subprocess.run(
        [
            str(sandbox.bin_dir / "kubectl"),
            "--kubeconfig",
            str(config),
            "config",
            "set-context",
            "--current",
            f"--namespace={namespace}",
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    res = leaks(KUBECONFIG=str(config))
    assert res.returncode == 0, res.stderr
    assert "Deployment/web" in res.stdout

    # `kubectl connbudget leaks`: kubectl runs kubectl-connbudget from PATH, as pip installs it.
    plugin = tmp_path / "bin" / "kubectl-connbudget"
    plugin.parent.mkdir()
    plugin.write_text(
        f"#!{sys.executable}\nimport sys\nfrom connbudget.cli import main\nsys.exit(main())\n"
    )
    plugin.chmod(0o755)
    res = subprocess.run(
        [str(sandbox.bin_dir / "kubectl"), "connbudget", "leaks", "-n", namespace],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(
            KUBECONFIG=sandbox.kubeconfig,
            PATH=f"{plugin.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        ),
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[1].split()[:2] == ["app-db", "Deployment/web"]


def test_a_user_who_may_not_list_budgets_gets_one_line_and_exit_2(
    sandbox: Sandbox,
    kube_api: kubernetes.client.ApiClient,
    budgets: Budgets,
    namespace: str,
    tmp_path: Path,
) -> None:
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "nobody"}})
    token = core.create_namespaced_service_account_token(
        "nobody", namespace, {"spec": {"expirationSeconds": 600}}
    ).status.token
    weak = tmp_path / "nobody.kubeconfig"
    weak.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "sandbox",
                        "cluster": {
                            "server": sandbox.state["apiServer"]["server"],
                            "certificate-authority": sandbox.state["apiServer"]["caFile"],
                        },
                    }
                ],
                "users": [{"name": "nobody", "user": {"token": token}}],
                "contexts": [
                    {"name": "nobody", "context": {"cluster": "sandbox", "user": "nobody"}}
                ],
                "current-context": "nobody",
            }
        )
    )
    res = leaks("-n", namespace, "--kubeconfig", str(weak))
    assert res.returncode == 2
    assert res.stdout == ""
    (line,) = res.stderr.splitlines()
    assert line.startswith(
        f"connbudget leaks: not allowed to list connectionbudgets.connbudget.io in namespace "
        f"{namespace} ("
    ), line
    assert "Traceback" not in res.stderr
    assert token not in res.stderr
