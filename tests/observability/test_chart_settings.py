"""The chart's operator settings that reach the operator as its environment: the API call rate."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from connbudget.config import OperatorConfig
from sandbox.prometheus import CHART, KUBE_VERSION, helm_template


def operator_env(helm: Path, *settings: str) -> dict[str, str]:
    (deployment,) = helm_template(helm, *settings, show_only="templates/deployment.yaml")
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def test_the_api_call_rate_reaches_the_operator_as_it_reads_it(helm: Path) -> None:
    env = operator_env(helm)
    config = OperatorConfig.from_env(env)
    assert (config.kube_qps, config.kube_burst) == (50.0, 100)
    env = operator_env(helm, "kubeApi.qps=0", "kubeApi.burst=20")
    config = OperatorConfig.from_env(env)
    assert (config.kube_qps, config.kube_burst) == (0.0, 20)


def test_the_values_schema_refuses_an_api_call_rate_that_cannot_work(helm: Path) -> None:
    render = [str(helm), "template", "x", str(CHART), "--kube-version", KUBE_VERSION]
    for setting in ("kubeApi.burst=0", "kubeApi.qps=-1", "kubeApi.qsp=5"):
        res = subprocess.run(
            [*render, "--set", setting],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert res.returncode != 0, setting
        assert "kubeApi" in res.stderr, setting
