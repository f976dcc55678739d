"""The compiled apps: the Go app (pgx v5) and the Java app (HikariCP, pgjdbc), built from source.

Each is built once into ``~/.cache/connbudget/apps/<name>-<hash>/`` (the folder of
``sandbox.apps.envs``), where the hash covers its sources, its pins and the toolchain's version:
a changed pin or source builds anew, an unchanged one is reused at once. The folder is stamped
when the build is complete, so a build cut short is built again.

- ``go``: ``tests/sandbox/apps/go/`` (``go.mod`` and ``go.sum`` pin every module), built by
  ``go build`` with ``GOFLAGS=-mod=readonly`` (a missing or changed ``go.sum`` line fails the
  build instead of being written) into ``go-<hash>/go-pg-app``; the hash covers ``go.mod``,
  ``go.sum``, the ``.go`` files and ``go version``. Modules come from the Go module proxy into
  Go's own module cache.
- ``java``: ``tests/sandbox/apps/java/`` (``pom.xml`` pins every dependency and plugin), built
  by ``mvn package`` into one runnable jar, ``java-<hash>/java-hikari-app.jar``; the hash covers
  ``pom.xml``, the ``.java`` files and ``java -version``. Artifacts come from Maven Central into a
  local repository of our own, ``~/.cache/connbudget/maven``; a build tries it offline first, so
  once it holds the pins nothing is downloaded. Should Java not trust the HTTPS proxy's
  certificate (a PKIX error), a truststore is made from the system's CA bundle and the build
  retried with it.

``python -m sandbox.apps.envs`` (what ``tests/sandbox/apps/setup`` runs) builds both; ``python -m
sandbox.apps.builds [go|java]`` builds one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sandbox.apps.envs import STAMP, cache_dir

HERE = Path(__file__).resolve().parent
GO_SOURCE = HERE / "go"
JAVA_SOURCE = HERE / "java"
BUILDS = ("go", "java")
GO_BINARY = "go-pg-app"
JAVA_JAR = "java-hikari-app.jar"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# A small JVM per pod: a few threads and connections need little heap, and C1 alone starts fast.
JVM_OPTIONS = ("-Xmx96m", "-Xss512k", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")

Say = Callable[[str], None]


class BuildError(RuntimeError):
    """A build that failed, with what to do about it."""


@functools.cache
def _version(argv: tuple[str, ...]) -> str:
    """A toolchain's version text (``go version``; ``java -version`` prints it on stderr), or
    ``missing``: then the build folder names no existing build and ``ensure`` says what to do."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return "missing"
    return done.stdout + done.stderr


def _key(files: list[Path], toolchain: str) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(HERE).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    digest.update(toolchain.encode())
    return digest.hexdigest()[:12]


def go_sources() -> list[Path]:
    return [GO_SOURCE / "go.mod", GO_SOURCE / "go.sum", *sorted(GO_SOURCE.glob("*.go"))]


def java_sources() -> list[Path]:
    return [JAVA_SOURCE / "pom.xml", *sorted((JAVA_SOURCE / "src").rglob("*.java"))]


def build_dir(name: str) -> Path:
    """Where the build of ``name`` lives (whether or not it exists yet)."""
    if name == "go":
        key = _key(go_sources(), _version(("go", "version")))
    elif name == "java":
        key = _key(java_sources(), _version(("java", "-version")))
    else:
        raise ValueError(f"unknown build {name!r} (known: {', '.join(BUILDS)})")
    return cache_dir() / "apps" / f"{name}-{key}"


def go_binary() -> Path:
    """The Go app's executable."""
    return build_dir("go") / GO_BINARY


def java_jar() -> Path:
    """The Java app's runnable jar."""
    return build_dir("java") / JAVA_JAR


def java_command() -> list[str]:
    """The command that runs the Java app with the ``java`` its build was keyed on."""
    java = shutil.which("java") or "java"
    return [os.path.realpath(java), *JVM_OPTIONS, "-jar", str(java_jar())]


def maven_repo() -> Path:
    """The Maven local repository the Java build reads and fills (never ``~/.m2``)."""
    return cache_dir() / "maven"


def is_ready(name: str) -> bool:
    return (build_dir(name) / STAMP).exists()


def _run(argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> bool:
    """Run a build step with its output in ``log``; whether it succeeded."""
    with log.open("ab") as out:
        done = subprocess.run(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return done.returncode == 0


def _tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _build_go(folder: Path, log: Path) -> None:
    if shutil.which("go") is None:
        raise BuildError(
            "go not found: install Go 1.26 or newer (tests/setup needs it for the sandbox's "
            "control plane too), then run tests/sandbox/apps/setup go"
        )
    env = dict(
        os.environ,
        GOFLAGS="-mod=readonly -modcacherw -buildvcs=false",
        GOTOOLCHAIN="local",  # the go version the build is keyed on, never a downloaded one
        CGO_ENABLED="0",
    )
    partial = folder / f"{GO_BINARY}.partial"
    argv = ["go", "build", "-trimpath", "-ldflags=-s -w", "-o", str(partial), "."]
    if not _run(argv, GO_SOURCE, env, log):
        raise BuildError(
            f"the Go app did not build:\n{_tail(log)}\n"
            "a missing go.sum line means the pins changed: run `go mod tidy` in "
            "tests/sandbox/apps/go and commit go.sum; a download error needs the Go module "
            "proxy (check the network or GOPROXY); then run tests/sandbox/apps/setup go"
        )
    partial.rename(folder / GO_BINARY)


def _truststore(say: Say) -> Path:
    """A PKCS12 truststore of every certificate in the system's CA bundle (keytool imports one
    certificate per call), kept in the cache and made again when the bundle changes."""
    bundle = CA_BUNDLE.read_bytes()
    store = cache_dir() / f"java-truststore-{hashlib.sha256(bundle).hexdigest()[:12]}.p12"
    if store.exists():
        return store
    say(f"apps: making a Java truststore from {CA_BUNDLE} (once)")
    marker = b"-----END CERTIFICATE-----"
    certs = [c + marker for c in bundle.split(marker) if b"-----BEGIN CERTIFICATE-----" in c]
    partial = store.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, cert in enumerate(certs):
            pem = Path(tmp) / f"{i}.pem"
            pem.write_bytes(cert.strip() + b"\n")
            subprocess.run(
                [
                    *("keytool", "-importcert", "-noprompt", "-alias", f"ca-{i}"),
                    *("-file", str(pem), "-keystore", str(partial)),
                    *("-storetype", "PKCS12", "-storepass", "changeit"),
                ],
                check=True,
                capture_output=True,
            )
    partial.rename(store)
    return store


def _build_java(folder: Path, log: Path, say: Say) -> None:
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if missing:
        raise BuildError(
            f"{' and '.join(missing)} not found: install Java 17 and Maven 3.8 or newer "
            "(apt-get install openjdk-17-jdk-headless maven), then run "
            "tests/sandbox/apps/setup java"
        )
    work = folder / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    shutil.copy2(JAVA_SOURCE / "pom.xml", work / "pom.xml")
    shutil.copytree(JAVA_SOURCE / "src", work / "src")
    repo = maven_repo()
    repo.mkdir(parents=True, exist_ok=True)
    mvn = ["mvn", "-B", "-q", f"-Dmaven.repo.local={repo}", "-DskipTests", "package"]
    env = dict(os.environ)
    # Offline first: once the local repository holds the pins, nothing is asked of the network.
    built = _run([*mvn, "-o"], work, env, log)
    if not built:
        say("apps: fetching the Java app's pinned artifacts into the Maven cache")
        built = _run(mvn, work, env, log)
    if not built and "PKIX" in log.read_text(errors="replace"):
        store = _truststore(say)
        trust = f"-Djavax.net.ssl.trustStore={store} -Djavax.net.ssl.trustStorePassword=changeit"
        env["MAVEN_OPTS"] = f"{env.get('MAVEN_OPTS', '')} {trust}".strip()
        built = _run(mvn, work, env, log)
    if not built:
        raise BuildError(
            f"the Java app did not build:\n{_tail(log)}\n"
            "a resolution error needs Maven Central (check the network; a PKIX error means "
            f"Java does not trust the proxy: add its CA to {CA_BUNDLE}); a compile error is in "
            "tests/sandbox/apps/java; then run tests/sandbox/apps/setup java"
        )
    (work / "target" / JAVA_JAR).rename(folder / JAVA_JAR)
    shutil.rmtree(work)


def ensure(name: str, say: Say = print) -> Path:
    """Build ``name`` (``go`` or ``java``) unless its build is ready; return its folder."""
    folder = build_dir(name)
    if is_ready(name):
        return folder
    say(f"apps: building {folder.name} (pinned by {'go.sum' if name == 'go' else 'pom.xml'})")
    started = time.monotonic()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log = folder / "build.log"
    if name == "go":
        _build_go(folder, log)
    else:
        _build_java(folder, log, say)
    sources = go_sources() if name == "go" else java_sources()
    (folder / STAMP).write_text("".join(f"{p.relative_to(HERE)}\n" for p in sources))
    say(f"apps: {folder.name} ready in {time.monotonic() - started:.0f}s")
    return folder


def main() -> None:
    names = sys.argv[1:] or list(BUILDS)
    unknown = [n for n in names if n not in BUILDS]
    if unknown:
        sys.exit(f"unknown build(s): {', '.join(unknown)} (known: {', '.join(BUILDS)})")
    for name in names:
        try:
            ensure(name, say=lambda m: print(m, file=sys.stderr, flush=True))
        except BuildError as e:
            sys.exit(f"apps: {e}")


if __name__ == "__main__":
    main()
