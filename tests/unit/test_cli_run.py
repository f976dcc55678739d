"""``connbudget run``: its settings from the environment, with the flags given over them."""

from __future__ import annotations

import pytest

from connbudget import cli
from connbudget.config import OperatorConfig
from connbudget.handlers import lifecycle

ENV = {
    "CONNBUDGET_NAMESPACES": "shop,billing",
    "CONNBUDGET_METRICS_PORT": "9191",
    "CONNBUDGET_LIVENESS": "http://0.0.0.0:8081/healthz",
    "CONNBUDGET_LOG_FORMAT": "text",
    "CONNBUDGET_STANDALONE": "true",
}


def config_of(*argv: str, environ: dict[str, str] | None = None) -> OperatorConfig:
    return cli.run_config(cli.build_parser().parse_args(["run", *argv]), environ or {})


def test_without_flags_the_environment_decides() -> None:
    assert config_of(environ=ENV) == OperatorConfig(
        namespaces=("shop", "billing"),
        metrics_port=9191,
        liveness="http://0.0.0.0:8081/healthz",
        log_format="text",
        standalone=True,
    )
    assert config_of() == OperatorConfig()


def test_each_flag_given_wins_over_the_environment() -> None:
    config = config_of(
        "-n",
        "web",
        "--metrics-port",
        "0",
        "--liveness",
        "",
        "--log-format",
        "json",
        "--kubeconfig",
        "/k",
        environ=ENV,
    )
    assert config.namespaces == ("web",)
    assert config.metrics_port == 0
    assert config.liveness is None
    assert config.log_format == "json"
    assert config.kubeconfig == "/k"
    assert config.standalone  # a flag that is not given leaves the variable's value


def test_the_api_call_rate_flags_win_over_the_environment() -> None:
    env = {"CONNBUDGET_KUBE_QPS": "20", "CONNBUDGET_KUBE_BURST": "30"}
    assert (config_of(environ=env).kube_qps, config_of(environ=env).kube_burst) == (20.0, 30)
    config = config_of("--kube-qps", "5", "--kube-burst", "10", environ=env)
    assert (config.kube_qps, config.kube_burst) == (5.0, 10)


def test_all_namespaces_watches_every_namespace_whatever_the_environment_says() -> None:
    config = config_of("--all-namespaces", environ=ENV)
    assert config.namespaces == ()
    assert config.all_namespaces
    assert config_of("-A").all_namespaces
    assert not config_of("-n", "a", "-n", "b").all_namespaces
    with pytest.raises(cli.UsageError, match="not both"):
        config_of("-n", "web", "--all-namespaces")


def test_the_operator_runs_with_the_settings_of_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started: list[OperatorConfig] = []
    monkeypatch.setattr(lifecycle, "run_operator", started.append)
    monkeypatch.setattr(cli, "setup_logging", lambda fmt: None)
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["run"]) == cli.EXIT_OK
    assert cli.main(["run", "--all-namespaces", "--metrics-port", "9292"]) == cli.EXIT_OK
    first, second = started
    assert first.namespaces == ("shop", "billing")
    assert (first.metrics_port, first.log_format, first.standalone) == (9191, "text", True)
    assert second.all_namespaces
    assert second.metrics_port == 9292


@pytest.mark.parametrize(
    ("argv", "environ", "problem"),
    [
        (["-n", "a", "-A"], {}, "not both"),
        ([], {"CONNBUDGET_LOG_FORMAT": "xml"}, "CONNBUDGET_LOG_FORMAT"),
        (["--metrics-port", "70000"], {}, "metrics port"),
    ],
)
def test_bad_settings_stop_the_run_with_a_usage_error(
    argv: list[str],
    environ: dict[str, str],
    problem: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started: list[OperatorConfig] = []
    monkeypatch.setattr(lifecycle, "run_operator", started.append)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["run", *argv]) == cli.EXIT_USAGE
    assert problem in capsys.readouterr().err
    assert started == []
