"""The container image, built for real: buildah on a Debian base, from the Dockerfile as it is.

The build (``sandbox.image_build``) is cached by content, so only the first test session after a
change pays for it. Its root filesystem then runs as a container would run it
(``sandbox.container``: overlay root, read-only, chroot, the image's user), and its layers are
searched for what must never ship: a compiler, a pip cache, wheels, and the CA bundle the build
was given as a secret.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import container, image_build

ROOT = image_build.ROOT
SAMPLES = ROOT / "manifests" / "samples"
NONROOT = (65532, 65532)
# The application layer was ~180 MB before trimming (bytecode kept, kubernetes.aio and packaged
# tests dropped: ~110 MB). A budget with some room, so a new heavy dependency is a decision.
APP_LAYER_BUDGET_MB = 130
RUN_TIMEOUT = 120  # seconds for one command in the image (the first import compiles nothing)
COMPILERS = ("gcc", "cc", "c++", "g++", "clang", "x86_64-linux-gnu-gcc", "tcc")
PATH_DIRS = ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin")

pytestmark = pytest.mark.timeout(1800)  # a cold build: the Debian base, then every dependency


@pytest.fixture(scope="module")
def built() -> image_build.BuiltImage:
    try:
        return image_build.build(progress=lambda m: print(f"image build: {m}"))
    except image_build.BuildError as e:
        pytest.fail(f"the image did not build: {e}")


def run_in_image(
    built: image_build.BuiltImage,
    scratch: Path,
    argv: list[str],
    *,
    binds: list[tuple[str, str]] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the image as a container runtime would: read-only root, the image's user,
    its environment and entrypoint-less argv."""
    user = container.image_user(built.rootfs, built.config.get("User", ""))
    prefix = container.rootfs_prefix(
        rootfs=built.rootfs,
        scratch=scratch,
        binds=binds or [],
        read_only=True,
        user=user,
        workdir=built.config.get("WorkingDir") or "/",
        read_only_binds=frozenset(dst for _, dst in binds or []),
    )
    env = dict(item.split("=", 1) for item in built.config.get("Env", []))
    return subprocess.run(
        prefix + argv,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def layer_members(
    built: image_build.BuiltImage,
) -> Iterator[tuple[str, tarfile.TarFile, tarfile.TarInfo]]:
    for layer, path in image_build.layer_tars(built.layout):
        with tarfile.open(path) as tar:
            for member in tar:
                yield layer.digest, tar, member


def test_the_image_config_is_the_dockerfiles(built: image_build.BuiltImage) -> None:
    config = built.config
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["connbudget"]
    assert config["Cmd"] == ["run"]
    assert {"8080/tcp", "9090/tcp"} <= set(config["ExposedPorts"])
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "connbudget"
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert not [k for k in env if k in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")]
    # The Debian base, then one layer for the final stage: the build stage left nothing behind.
    assert len(built.layers) == 2
    assert "mmdebstrap" in built.layers[0].created_by
    assert "pip install --no-index" in built.layers[1].created_by


def test_the_entrypoint_runs_as_65532_on_a_read_only_root(
    built: image_build.BuiltImage, tmp_path: Path
) -> None:
    version = run_in_image(built, tmp_path, [*built.config["Entrypoint"], "--version"])
    assert version.returncode == 0, version.stderr
    assert re.fullmatch(r"connbudget \d+\.\d+\.\d+\S*\n", version.stdout), version.stdout
    probe = (
        "import os, sys\n"
        "print(os.getuid(), os.getgid(), os.getgroups(), sys.executable)\n"
        "try:\n    open('/written', 'w')\nexcept OSError as e:\n    print(e.strerror)\n"
    )
    who = run_in_image(built, tmp_path, ["python", "-c", probe])
    assert who.returncode == 0, who.stderr
    ids, refused = who.stdout.splitlines()
    assert ids.split()[:2] == [str(n) for n in NONROOT]
    assert "[]" in ids  # no supplementary groups
    assert refused == "Read-only file system"


def test_check_validates_budgets_with_the_crd_inside_the_image(
    built: image_build.BuiltImage, tmp_path: Path
) -> None:
    samples = sorted(SAMPLES.glob("*.yaml"))
    assert samples
    bad = tmp_path / "input" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text(
        "apiVersion: connbudget.io/v1alpha1\nkind: ConnectionBudget\nmetadata: {name: web}\n"
        "spec:\n  budget: {maxConnections: -3}\n"
    )
    binds = [(str(SAMPLES), "/samples"), (str(bad.parent), "/input")]
    entry = built.config["Entrypoint"]
    good = run_in_image(
        built,
        tmp_path / "good",
        [*entry, "check", *(f"/samples/{p.name}" for p in samples)],
        binds=binds,
    )
    assert good.returncode == 0, good.stdout + good.stderr
    refused = run_in_image(
        built, tmp_path / "bad", [*entry, "check", "/input/bad.yaml"], binds=binds
    )
    assert refused.returncode != 0
    assert "maxConnections" in refused.stdout + refused.stderr


def test_the_image_holds_no_compiler_cache_wheel_or_secret(built: image_build.BuiltImage) -> None:
    rootfs = built.rootfs
    compilers = [f"/{d}/{c}" for d in PATH_DIRS for c in COMPILERS if (rootfs / d / c).exists()]
    assert compilers == []
    wheels = [str(p) for p in rootfs.rglob("*.whl")]
    assert wheels == []
    pip_caches = [str(p) for p in rootfs.glob("**/.cache/pip")] + [
        str(p) for p in (rootfs / "root").glob(".cache/*")
    ]
    assert pip_caches == []
    assert not (rootfs / "wheels").exists()
    assert not (rootfs / "src").exists(), "the build stage's sources stayed in the build stage"
    site = next(rootfs.glob("usr/local/lib/python3*/*-packages"))
    assert (site / "connbudget").is_dir()
    assert not (site / "kubernetes" / "aio").exists()
    assert [str(p) for p in site.rglob("tests") if p.is_dir()] == []

    # The CA bundle went in as a build secret: no layer has it, by path or by content.
    ca = image_build.CA_BUNDLE.read_bytes()
    ca_sha = hashlib.sha256(ca).hexdigest()
    leaks = []
    for digest, tar, member in layer_members(built):
        name = member.name.lstrip("./")
        if name.startswith("run/secrets/") or name.endswith(".whl"):
            leaks.append(f"{digest[:19]} {name}")
        if member.isfile() and member.size == len(ca):
            f = tar.extractfile(member)
            assert f is not None
            if hashlib.sha256(f.read()).hexdigest() == ca_sha:
                leaks.append(f"{digest[:19]} {name} (the CA bundle)")
    assert leaks == []


def test_the_layers_and_their_sizes(built: image_build.BuiltImage) -> None:
    table = image_build.size_table(built)
    print("\n" + table)
    header, *rows, total = table.splitlines()
    assert built.name in header
    assert [layer.digest[7:19] for layer in built.layers] == [row.split()[4] for row in rows]
    assert f"{built.total_size / 1e6:.1f} MB" in total
    app = built.layers[-1]
    assert 0 < app.size < APP_LAYER_BUDGET_MB * 1e6, table
    assert app.compressed_size < app.size
    # The recorded size is the layer's real size: its members add up to less than the tar.
    with tarfile.open(image_build.layer_tars(built.layout).__next__()[1]) as tar:
        files = sum(m.size for m in tar)
    assert files <= built.layers[0].size


def test_the_context_holds_what_the_dockerfile_copies() -> None:
    dockerfile = image_build.DOCKERFILE.read_text()
    copied = {
        src.rstrip("/")
        for line in dockerfile.splitlines()
        if line.startswith("COPY ") and "--from" not in line
        for src in line.split()[1:-1]
    }
    assert copied == set(image_build.CONTEXT)
    ignore = image_build.DOCKERIGNORE.read_text().splitlines()
    assert "*" in ignore
    assert {line[1:].rstrip("/") for line in ignore if line.startswith("!")} == copied


def _layout(folder: Path, layers: list[dict[str, bytes | None]]) -> Path:
    """An OCI layout whose layers set files (bytes) or delete them (None: a whiteout)."""
    blobs = folder / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    descs = []
    for files in layers:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in files.items():
                parent, _, base = name.rpartition("/")
                if data is None:
                    name = f"{parent}/.wh.{base}" if parent else f".wh.{base}"
                    data = b""
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", **put(buf.getvalue())})
    config = put(
        json.dumps({"config": {}, "history": [{"created_by": "x"}] * len(layers)}).encode()
    )
    manifest = put(json.dumps({"schemaVersion": 2, "config": config, "layers": descs}).encode())
    (folder / "index.json").write_text(json.dumps({"manifests": [manifest]}))
    return folder


def test_unpacking_applies_layers_in_order_with_whiteouts(tmp_path: Path) -> None:
    layout = _layout(
        tmp_path / "oci",
        [
            {"etc/keep": b"1", "etc/gone": b"2", "opt/old/a": b"3", "opt/old/b": b"4"},
            {"etc/keep": b"5", "etc/gone": None, "opt/old/.wh..wh..opq": b"", "opt/old/c": b"6"},
        ],
    )
    dest = tmp_path / "rootfs"
    image_build.unpack(layout, dest)
    assert (dest / "etc" / "keep").read_bytes() == b"5"
    assert not (dest / "etc" / "gone").exists()
    assert sorted(p.name for p in (dest / "opt" / "old").iterdir()) == ["c"]


def test_a_layer_cannot_write_outside_the_root_filesystem(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    layout = _layout(tmp_path / "oci", [{"ok": b"1"}])
    # Swap the one layer's blob for the hostile tar (the layout's digests are not re-checked).
    _, blob = next(image_build.layer_tars(layout))
    blob.write_bytes(buf.getvalue())
    with pytest.raises(tarfile.OutsideDestinationError):
        image_build.unpack(layout, tmp_path / "rootfs")
    assert not (tmp_path / "escaped").exists()


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/var/run/secrets/x", "/run/secrets/x", id="absolute-symlink"),
        pytest.param("/bin/tool", "/usr/bin/tool", id="relative-symlink"),
        pytest.param("/etc/../opt/./a", "/opt/a", id="dots"),
        pytest.param("/loop/a", None, id="symlink-loop"),
    ],
)
def test_mount_points_resolve_inside_the_image(
    tmp_path: Path, path: str, expected: str | None
) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "run").symlink_to("/run")
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "bin").symlink_to("usr/bin")
    (tmp_path / "loop").symlink_to("/loop")
    if expected is None:
        with pytest.raises(ValueError, match="too many symlinks"):
            container.resolve_in_root(tmp_path, path)
    else:
        assert container.resolve_in_root(tmp_path, path) == expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param("", (0, 0), id="empty-is-root"),
        pytest.param("65532:65532", (65532, 65532), id="numeric"),
        pytest.param("1000", (1000, 1000), id="uid-only"),
        pytest.param("app", (1001, 1002), id="name-from-passwd"),
        pytest.param("app:staff", (1001, 50), id="names"),
    ],
)
def test_the_images_user_is_resolved_in_the_image(
    tmp_path: Path, spec: str, expected: tuple[int, int]
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1001:1002::/:/x\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\nstaff:x:50:\n")
    assert container.image_user(tmp_path, spec) == expected
