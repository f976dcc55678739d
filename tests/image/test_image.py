"""The container image, as far as it can be proven without a Docker engine.

hadolint lints the Dockerfile; our own checks hold it to the image policy (non-root numeric user,
exec-form entrypoint, OCI labels, no build leftovers); and the wheel is built exactly as the
Dockerfile builds it, installed alone into a clean virtual environment, and its entrypoint run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
OCI_LABELS = ("title", "description", "version", "licenses", "source")


def stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), split by FROM."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]
    out: list[list[str]] = []
    for ln in lines:
        if ln.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(ln)
    return out


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    res = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_final_stage_follows_the_image_policy() -> None:
    *_, final = stages()
    assert len(stages()) >= 2, "multi-stage: the wheel is built apart from the runtime"
    text = "\n".join(final)
    user = [ln.split(None, 1)[1] for ln in final if ln.upper().startswith("USER ")]
    assert user, "the final stage sets a user"
    uid = user[-1].split(":")[0]
    assert uid.isdigit(), "a numeric UID (runAsNonRoot can verify it)"
    assert int(uid) > 0, "not root"
    assert 'ENTRYPOINT ["connbudget"]' in text
    assert 'CMD ["run"]' in text
    for label in OCI_LABELS:
        assert f"org.opencontainers.image.{label}=" in text
    assert not any(ln.upper().startswith("ADD ") for s in stages() for ln in s)
    assert "COPY --from" not in text, "wheels come in through a bind mount, never as a layer"
    assert "--mount=type=bind,from=build" in text
    assert "gcc" not in text
    assert "build-essential" not in text
    # A proxy's CA reaches pip only as a build secret of the build stage, and only if given.
    build_text = "\n".join(stages()[0])
    assert "--mount=type=secret,id=ca," in build_text
    assert (
        "if [ -s /run/secrets/ca.crt ]; then export PIP_CERT=/run/secrets/ca.crt; fi" in build_text
    )
    assert "type=secret" not in text
    assert "PIP_CERT" not in text
    for stage in stages():
        base = stage[0].split()[1]
        assert not base.endswith(":latest")


@pytest.mark.timeout(600)
def test_the_wheel_installs_alone_and_its_entrypoint_runs(tmp_path: Path) -> None:
    # The Dockerfile's build context, as it copies it.
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(ROOT / name, ctx / name)
    shutil.copytree(ROOT / "crds", ctx / "crds")
    shutil.copytree(
        ROOT / "operator",
        ctx / "operator",
        symlinks=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--wheel-dir", str(wheels), str(ctx)], check=True, timeout=300
    )
    (wheel,) = wheels.glob("connbudget-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "connbudget/data/connectionbudgets.connbudget.io.yaml" in names
    assert "connbudget/py.typed" in names
    assert not [n for n in names if n.startswith(("sandbox/", "tests/", "operator/"))]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--wheel-dir",
            str(wheels),
            "--constraint",
            str(ctx / "constraints.txt"),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-index",
            "--find-links",
            str(wheels),
            "connbudget",
        ],
        check=True,
        timeout=300,
    )
    cmd = str(venv / "bin" / "connbudget")
    version = subprocess.run(
        [cmd, "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert version.stdout.startswith("connbudget ")
    run_help = subprocess.run(
        [cmd, "run", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "--namespace" in run_help.stdout
    sample = tmp_path / "cb.yaml"
    sample.write_text(
        "apiVersion: connbudget.io/v1alpha1\nkind: ConnectionBudget\nmetadata: {name: web}\n"
        "spec:\n  database: {secretRef: {name: pg}}\n  budget: {maxConnections: 80}\n"
        "  selector: {matchLabels: {app: web}}\n"
    )
    check = subprocess.run(
        [cmd, "check", str(sample)], capture_output=True, text=True, timeout=60, check=False
    )
    assert check.returncode == 0, check.stderr  # the CRD schema ships inside the wheel
