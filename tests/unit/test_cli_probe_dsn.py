"""``connbudget probe``: where its DSNs come from, and that none of them is ever printed."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from connbudget import cli

PASSWORD = "Planted Frag-9xQ"  # a space: libpq quotes what follows it when the DSN is unquoted
FRAGMENTS = ("Planted", "Frag-9xQ")
MALFORMED = f"host=127.0.0.1 port=1 user=u password={PASSWORD} dbname=app"
GOOD = "host=127.0.0.1 port=1 user=u password=pw-Good-1 dbname=app"
ADMIN = "host=127.0.0.1 port=2 user=admin password=pw-Admin-2 dbname=pgbouncer"


def dsns(*argv: str, environ: dict[str, str] | None = None) -> tuple[str, str | None]:
    args = cli.build_parser().parse_args(["probe", *argv])
    return cli.probe_dsns(args, environ or {})


def test_the_dsns_come_from_the_arguments_first_then_the_environment() -> None:
    env = {cli.DSN_ENV: GOOD, cli.PGBOUNCER_DSN_ENV: ADMIN}
    assert dsns(environ=env) == (GOOD, ADMIN)
    assert dsns(environ={cli.DSN_ENV: GOOD}) == (GOOD, None)
    assert dsns("host=other", "--pgbouncer", "host=bouncer", environ=env) == (
        "host=other",
        "host=bouncer",
    )
    assert dsns("host=only") == ("host=only", None)  # the positional form still works


def test_the_dsns_come_from_files(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text(GOOD + "\n")
    (tmp_path / "admin").write_text(f"  {ADMIN}\n\n")
    argv = ["--dsn-file", str(tmp_path / "dsn"), "--pgbouncer-dsn-file", str(tmp_path / "admin")]
    assert dsns(*argv) == (GOOD, ADMIN)
    # A file given on the command line wins over the environment.
    assert dsns(*argv, environ={cli.DSN_ENV: "host=env", cli.PGBOUNCER_DSN_ENV: "host=x"}) == (
        GOOD,
        ADMIN,
    )


def test_a_dsn_file_can_be_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(GOOD + "\n"))
    assert dsns("--dsn-file", "-") == (GOOD, None)
    with pytest.raises(cli.UsageError, match="only one"):
        dsns("--dsn-file", "-", "--pgbouncer-dsn-file", "-")


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        ([], "no DSN"),
        (["host=a", "--dsn-file", "f"], "not both"),
        (["host=a", "--pgbouncer", "host=b", "--pgbouncer-dsn-file", "f"], "not both"),
        (["--dsn-file", "/nonexistent/connbudget-dsn"], "cannot read --dsn-file"),
    ],
)
def test_usage_errors(argv: list[str], problem: str) -> None:
    with pytest.raises(cli.UsageError, match=problem):
        dsns(*argv)


def test_an_empty_dsn_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "dsn").write_text("\n")
    with pytest.raises(cli.UsageError, match="is empty"):
        dsns("--dsn-file", str(tmp_path / "dsn"))


def test_an_unreadable_dsn_file_is_named_without_its_content(tmp_path: Path) -> None:
    path = tmp_path / "dsn"
    path.write_bytes(b"\xff\xfe" + PASSWORD.encode())  # not UTF-8
    with pytest.raises(cli.UsageError) as err:
        dsns("--dsn-file", str(path))
    assert str(path) in str(err.value)
    assert not [f for f in FRAGMENTS if f in str(err.value)]


def run_probe(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> tuple[int, str]:
    caplog.set_level(logging.DEBUG)
    code = cli.main(["probe", *argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err + caplog.text


@pytest.mark.parametrize("source", ["environment", "file", "argument"])
def test_a_malformed_dsn_is_named_and_never_shown(
    source: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv(cli.PGBOUNCER_DSN_ENV, raising=False)
    monkeypatch.delenv(cli.DSN_ENV, raising=False)
    argv: list[str] = []
    if source == "environment":
        monkeypatch.setenv(cli.DSN_ENV, MALFORMED)
    elif source == "file":
        (tmp_path / "dsn").write_text(MALFORMED)
        argv = ["--dsn-file", str(tmp_path / "dsn")]
    else:
        argv = [MALFORMED]
    code, output = run_probe(argv, capsys, caplog)
    assert code == cli.EXIT_PROBLEMS
    assert "DsnInvalid" in output
    assert not [f for f in FRAGMENTS if f in output], output


@pytest.mark.parametrize("source", ["environment", "file", "argument"])
def test_a_malformed_pgbouncer_dsn_is_named_before_connecting_and_never_shown(
    source: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GOOD names a port nothing listens on: were it tried first, the run would fail as
    # DatabaseUnreachable; the malformed admin DSN is found before any connection.
    monkeypatch.delenv(cli.PGBOUNCER_DSN_ENV, raising=False)
    monkeypatch.setenv(cli.DSN_ENV, GOOD)
    argv: list[str] = []
    if source == "environment":
        monkeypatch.setenv(cli.PGBOUNCER_DSN_ENV, MALFORMED)
    elif source == "file":
        (tmp_path / "admin").write_text(MALFORMED)
        argv = ["--pgbouncer-dsn-file", str(tmp_path / "admin")]
    else:
        argv = [GOOD, "--pgbouncer", MALFORMED]
    code, output = run_probe(argv, capsys, caplog)
    assert code == cli.EXIT_PROBLEMS
    assert "DsnInvalid" in output
    assert not [f for f in FRAGMENTS if f in output], output
