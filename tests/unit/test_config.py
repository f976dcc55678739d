"""Operator settings from the environment (``CONNBUDGET_*``)."""

from __future__ import annotations

import pytest

from connbudget.config import DEFAULT_LIVENESS, ConfigError, OperatorConfig


def test_without_variables_the_defaults() -> None:
    config = OperatorConfig.from_env({})
    assert config == OperatorConfig()
    assert config.namespaces == ()
    assert config.all_namespaces
    assert config.metrics_port == 9090
    assert config.liveness == DEFAULT_LIVENESS
    assert config.log_format == "json"
    assert not config.standalone


def test_every_variable_is_read() -> None:
    config = OperatorConfig.from_env(
        {
            "CONNBUDGET_NAMESPACES": " shop, billing ,,",
            "CONNBUDGET_METRICS_PORT": "9191",
            "CONNBUDGET_LIVENESS": "",
            "CONNBUDGET_LOG_FORMAT": "Text",
            "CONNBUDGET_STANDALONE": "true",
        }
    )
    assert config.namespaces == ("shop", "billing")
    assert not config.all_namespaces
    assert config.metrics_port == 9191
    assert config.liveness is None  # empty disables it
    assert config.log_format == "text"
    assert config.standalone


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"CONNBUDGET_METRICS_PORT": "http"}, "CONNBUDGET_METRICS_PORT"),
        ({"CONNBUDGET_METRICS_PORT": "70000"}, "CONNBUDGET_METRICS_PORT"),
        ({"CONNBUDGET_LOG_FORMAT": "xml"}, "CONNBUDGET_LOG_FORMAT"),
        ({"CONNBUDGET_STANDALONE": "maybe"}, "CONNBUDGET_STANDALONE"),
    ],
)
def test_a_bad_value_is_refused_naming_its_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        OperatorConfig.from_env(environ)


def test_the_process_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONNBUDGET_NAMESPACES", "shop")
    assert OperatorConfig.from_env().namespaces == ("shop",)


def test_shards_are_read_and_bounded() -> None:
    assert OperatorConfig.from_env({}).shards == 1
    assert OperatorConfig.from_env({"CONNBUDGET_SHARDS": "8"}).shards == 8
    for bad in ("0", "65", "two"):
        with pytest.raises(ConfigError, match="CONNBUDGET_SHARDS"):
            OperatorConfig.from_env({"CONNBUDGET_SHARDS": bad})
    with pytest.raises(ConfigError, match="leader election"):
        OperatorConfig(standalone=True, shards=2)


def test_the_api_call_rate_is_read_and_bounded() -> None:
    config = OperatorConfig.from_env({})
    assert (config.kube_qps, config.kube_burst) == (50.0, 100)
    config = OperatorConfig.from_env({"CONNBUDGET_KUBE_QPS": "0", "CONNBUDGET_KUBE_BURST": "7"})
    assert (config.kube_qps, config.kube_burst) == (0.0, 7)
    for name, bad in [
        ("CONNBUDGET_KUBE_QPS", "-1"),
        ("CONNBUDGET_KUBE_QPS", "fast"),
        ("CONNBUDGET_KUBE_QPS", "inf"),
        ("CONNBUDGET_KUBE_BURST", "0"),
        ("CONNBUDGET_KUBE_BURST", "2.5"),
    ]:
        with pytest.raises(ConfigError, match=name):
            OperatorConfig.from_env({name: bad})
    with pytest.raises(ConfigError, match="burst"):
        OperatorConfig(kube_burst=0)
