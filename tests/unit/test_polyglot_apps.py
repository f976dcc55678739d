"""The Go and Java apps classify a request's failure as the Python apps do, and their sources are
kept as their toolchains format them (no toolchain needed but gofmt, skipped without it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sandbox.apps import builds
from sandbox.workloads.outcomes import REFUSED_PHRASES, TERMINATED_PHRASES

GO_OUTCOMES = builds.GO_SOURCE / "outcome.go"
JAVA_OUTCOMES = builds.JAVA_SOURCE / "src/main/java/connbudget/sandbox/Outcomes.java"


def phrase_lists(source: str, names: tuple[str, str]) -> tuple[set[str], set[str]]:
    """The string literals of the refused and the terminated phrase lists of an app's source."""
    found = []
    for name in names:
        start = source.index(name)
        end = source.index(")" if "List.of" in source[start : start + 80] else "}", start)
        found.append(set(re.findall(r'"([^"]*)"', source[start:end])))
    return found[0], found[1]


@pytest.mark.parametrize(
    ("source", "names"),
    [
        (GO_OUTCOMES, ("refusedPhrases", "terminatedPhrases")),
        (JAVA_OUTCOMES, ("REFUSED_PHRASES =", "TERMINATED_PHRASES =")),
    ],
    ids=["go", "java"],
)
def test_the_servers_words_classify_as_in_the_python_apps(
    source: Path, names: tuple[str, str]
) -> None:
    refused, terminated = phrase_lists(source.read_text(), names)
    # What PostgreSQL (or PgBouncer) says, whatever the client library: the same outcome.
    server_said = {p for p in TERMINATED_PHRASES if p.startswith("terminating connection")}
    assert set(REFUSED_PHRASES) <= refused
    assert server_said <= terminated
    assert not refused & terminated
    assert all(p == p.lower() for p in refused | terminated)  # matched against lower case


@pytest.mark.skipif(shutil.which("gofmt") is None, reason="gofmt not installed")
def test_the_go_app_is_gofmt_clean() -> None:
    done = subprocess.run(
        ["gofmt", "-l", str(builds.GO_SOURCE)], capture_output=True, text=True, check=True
    )
    assert done.stdout == ""


def test_a_build_is_keyed_on_its_sources_and_toolchain() -> None:
    go = builds.go_sources()
    assert {p.name for p in go} >= {"go.mod", "go.sum", "main.go", "outcome.go"}
    assert builds._key(go, "go1") == builds._key(go, "go1")
    assert builds._key(go, "go1") != builds._key(go, "go2")
    assert builds._key(go, "go1") != builds._key(go[:-1], "go1")
    assert {p.name for p in builds.java_sources()} >= {"pom.xml", "App.java", "Outcomes.java"}
