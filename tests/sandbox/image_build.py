"""Build the operator's container image without Docker: buildah on a Debian base assembled here.

The ``Dockerfile`` is the one users build with Docker/BuildKit against the official Python image.
Here there is no Docker engine and no registry, so:

1. **The base image** named by the ``PYTHON_IMAGE`` build-arg is assembled from Debian bookworm's
   packages (``mmdebstrap --variant=minbase`` with python3, pip, venv and ca-certificates, no
   documentation, no ``usrmerge``/perl), and the Debian specifics the Dockerfile must not care
   about are handled here: the PEP 668 ``EXTERNALLY-MANAGED`` marker is removed (an image is
   its own environment, as in the official image) and ``/usr/local/bin/python`` points at
   ``python3``. The root filesystem is cached as a tarball under
   ``~/.cache/connbudget/debian-base-<key>/``, the key hashing its recipe, and imported into
   buildah's storage (``buildah from scratch``, ``add``, ``commit``) as
   ``localhost/connbudget-debian-base:<key>``.
2. **The image** is built by ``buildah bud --isolation chroot`` with the machine's CA bundle as
   the build secret ``ca`` (what a user behind a TLS-inspecting proxy passes to ``docker build``),
   pushed to an OCI layout, and its layers unpacked into a root
   filesystem. Everything lands in ``~/.cache/connbudget/image-<key>/``, the key hashing the
   Dockerfile, ``.dockerignore``, the build context and the base's key: a second build of the
   same sources is a cache hit, and a change to any of them builds again.

buildah's storage lives in ``~/.cache/connbudget/buildah/<driver>/`` (``overlay`` when the kernel
has it and we are root, else ``vfs``; ``CONNBUDGET_BUILDAH_DRIVER`` chooses), never in the
machine's default storage.

Run ``python -m sandbox.image_build build`` (from ``tests/``, in the project's venv) to build and
print the image's folder; ``sizes`` prints its layers and their sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# What the Dockerfile copies (and .dockerignore lets through): the image's inputs from the checkout.
CONTEXT = ("pyproject.toml", "README.md", "constraints.txt", "crds", "operator")
CONTEXT_SKIP = ("__pycache__", ".pyc", ".egg-info")
CA_BUNDLE = Path(os.environ.get("CONNBUDGET_BUILD_CA", "/etc/ssl/certs/ca-certificates.crt"))
IMAGE_NAME = "localhost/connbudget"
BASE_NAME = "localhost/connbudget-debian-base"
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates")
# perl and its modules come in only for usrmerge, which converts the tree once and is then dead
# weight (Debian's own images ship usr-is-merged instead); perl-base, which is essential, stays.
BASE_PURGE = (
    "usrmerge",
    "libfile-find-rule-perl",
    "libnumber-compare-perl",
    "libtext-glob-perl",
    "perl",
    "libperl5.36",
    "perl-modules-5.36",
)
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
BASE_RECIPE_VERSION = "3"  # bump when the assembly below changes in a way the argv does not show
KEEP_IMAGES = 3  # built images kept in the cache (each ~0.4 GB: the OCI layout and its rootfs)
BASE_TIMEOUT = 900.0  # seconds for mmdebstrap (~50 s through the proxy here)
BUILD_TIMEOUT = 1800.0  # seconds for buildah bud (pip downloads every dependency)
STEP_TIMEOUT = 300.0  # seconds for any other buildah step
LOCK_TIMEOUT = BASE_TIMEOUT + BUILD_TIMEOUT + 2 * STEP_TIMEOUT  # another session's whole build

Progress = Callable[[str], None]


class BuildError(RuntimeError):
    """A step of the build failed; the message names the step and the tail of its output."""


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int  # bytes of the layer's tar, uncompressed (what it takes on a node's disk)
    compressed_size: int  # bytes of the blob, as a registry would store and a node pull it
    created_by: str  # the Dockerfile instruction (or base step) that made it


@dataclass(frozen=True)
class BuiltImage:
    """A built image in the cache: its OCI layout, unpacked root filesystem and config."""

    folder: Path
    name: str
    config: dict[str, Any]  # the OCI image config's ``config``: Entrypoint, Cmd, Env, User, ...
    layers: tuple[Layer, ...]
    build_seconds: float

    @property
    def rootfs(self) -> Path:
        return self.folder / "rootfs"

    @property
    def layout(self) -> Path:
        return self.folder / "oci"

    @property
    def total_size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def compressed_size(self) -> int:
        return sum(layer.compressed_size for layer in self.layers)


def cache_dir() -> Path:
    return Path(
        os.environ.get("CONNBUDGET_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "connbudget"
    )


# --- buildah ----------------------------------------------------------------------------------


def storage_driver() -> str:
    chosen = os.environ.get("CONNBUDGET_BUILDAH_DRIVER")
    if chosen:
        return chosen
    has_overlay = "overlay" in Path("/proc/filesystems").read_text()
    return "overlay" if has_overlay and os.geteuid() == 0 else "vfs"


def buildah_argv() -> list[str]:
    """``buildah`` with the project's own storage (never the machine's default)."""
    exe = shutil.which("buildah")
    if exe is None:
        raise BuildError("buildah is not installed (tests/setup installs it with apt-get)")
    driver = storage_driver()
    store = cache_dir() / "buildah" / driver
    return [
        exe,
        "--root",
        str(store / "root"),
        "--runroot",
        str(store / "run"),
        "--storage-driver",
        driver,
    ]


def buildah_env() -> dict[str, str]:
    """The environment buildah runs with: its temporary files under the project's cache (not
    /var/tmp), and none of this machine's ``PIP_*``
    settings (the build sees only what the Dockerfile gives it; the CA comes in as a secret)."""
    tmp = cache_dir() / "buildah" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return env | {"TMPDIR": str(tmp)}


def _run(
    argv: list[str],
    *,
    what: str,
    timeout: float,
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run one step; its output goes to ``log`` (if given) and comes back; a failure says which
    step it was, with the end of its output."""
    try:
        res = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
            env=buildah_env() if env is None else env,
        )
    except subprocess.TimeoutExpired as e:
        raise BuildError(f"{what}: timed out after {timeout:.0f}s") from e
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {' '.join(argv)}\n{res.stdout}\n")
    if res.returncode != 0:
        tail = "\n".join(res.stdout.splitlines()[-30:])
        where = f" (full output in {log})" if log else ""
        raise BuildError(f"{what} failed with exit code {res.returncode}{where}:\n{tail}")
    return res.stdout


def _image_exists(name: str) -> bool:
    res = subprocess.run(
        [*buildah_argv(), "inspect", "--type", "image", name],
        capture_output=True,
        timeout=STEP_TIMEOUT,
        check=False,
        env=buildah_env(),
    )
    return res.returncode == 0


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """One build at a time per cache (two test sessions building at once wait for each other)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / f"{name}.lock").open("w") as f:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BuildError(
                        f"another build held {f.name} for {LOCK_TIMEOUT:.0f}s; giving up"
                    ) from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- the Debian base --------------------------------------------------------------------------


def base_recipe() -> list[str]:
    """The mmdebstrap arguments (without the output), which the base's cache key hashes."""
    purge = " ".join(BASE_PURGE)
    fixups = (
        # PEP 668: the image is its own environment, as in the official Python image.
        'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED'
        # The official image's names: python (and pip, which Debian already has).
        ' && ln -sf /usr/bin/python3 "$1"/usr/local/bin/python'
    )
    return [
        "--variant=minbase",
        f"--include=usr-is-merged,{','.join(BASE_PACKAGES)}",
        '--aptopt=APT::Install-Recommends "false"',
        # As Debian's slim images: no documentation, manual pages or translations.
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        # The pip and setuptools wheels python3-venv brings for `python3 -m venv` to bootstrap
        # pip: the official image has none, and an image ships no wheel files (`python3 -m venv
        # --without-pip` still works).
        "--dpkgopt=path-exclude=/usr/share/python-wheels/*",
        f'--customize-hook=chroot "$1" apt-get purge -y -q {purge}',
        f"--customize-hook={fixups}",
        # A container runtime provides /dev; device nodes in a layer only get in the way.
        "--skip=output/dev",
        SUITE,
    ]


def base_key() -> str:
    text = json.dumps([BASE_RECIPE_VERSION, base_recipe(), BASE_ENV])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_base(progress: Progress) -> str:
    """Assemble (or find) the Debian base image; return its name in buildah's storage."""
    key = base_key()
    name = f"{BASE_NAME}:{key}"
    folder = cache_dir() / f"debian-base-{key}"
    tarball = folder / "rootfs.tar"
    if not tarball.exists():
        exe = shutil.which("mmdebstrap")
        if exe is None:
            raise BuildError("mmdebstrap is not installed (apt-get install mmdebstrap)")
        folder.mkdir(parents=True, exist_ok=True)
        progress(f"base: mmdebstrap {SUITE} minbase + {', '.join(BASE_PACKAGES)} (~1 min)")
        t0 = time.monotonic()
        partial = folder / "rootfs.tar.partial"
        _run(
            [exe, *base_recipe(), str(partial)],
            what="mmdebstrap (the Debian base)",
            timeout=BASE_TIMEOUT,
            log=folder / "mmdebstrap.log",
        )
        partial.rename(tarball)
        progress(f"base: root filesystem made in {time.monotonic() - t0:.0f}s: {tarball}")
    if _image_exists(name):
        return name
    progress(f"base: importing {tarball.name} into buildah as {name}")
    buildah = buildah_argv()
    ctr = _run([*buildah, "from", "scratch"], what="buildah from scratch", timeout=STEP_TIMEOUT)
    ctr = ctr.strip().splitlines()[-1]
    try:
        _run([*buildah, "add", ctr, str(tarball), "/"], what="buildah add", timeout=STEP_TIMEOUT)
        env = [arg for k, v in BASE_ENV.items() for arg in ("--env", f"{k}={v}")]
        _run(
            [
                *buildah,
                "config",
                *env,
                "--cmd",
                "python3",
                "--created-by",
                f"mmdebstrap {SUITE}",
                ctr,
            ],
            what="buildah config",
            timeout=STEP_TIMEOUT,
        )
        _run([*buildah, "commit", "-q", ctr, name], what="buildah commit", timeout=STEP_TIMEOUT)
    finally:
        subprocess.run(
            [*buildah, "rm", ctr],
            capture_output=True,
            timeout=STEP_TIMEOUT,
            check=False,
            env=buildah_env(),
        )
    return name


# --- the image --------------------------------------------------------------------------------


def _context_files() -> Iterator[Path]:
    for entry in CONTEXT:
        path = ROOT / entry
        if path.is_file():
            yield path
            continue
        for p in sorted(path.rglob("*")):
            if p.is_file() and not any(s in str(p) for s in CONTEXT_SKIP):
                yield p


def image_key() -> str:
    """Hash of everything the image is made of: Dockerfile, .dockerignore, context, base."""
    h = hashlib.sha256(base_key().encode())
    for path in (DOCKERFILE, DOCKERIGNORE, *_context_files()):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
        h.update(b"x" if os.access(path, os.X_OK) else b"-")
    return h.hexdigest()[:16]


def find_built(key: str | None = None) -> BuiltImage | None:
    """The cached image for the checkout as it is now (or ``key``), if it was built."""
    folder = cache_dir() / f"image-{key or image_key()}"
    try:
        info = json.loads((folder / "image.json").read_text())
    except FileNotFoundError:
        return None
    return BuiltImage(
        folder=folder,
        name=info["name"],
        config=info["config"],
        layers=tuple(Layer(**layer) for layer in info["layers"]),
        build_seconds=info["buildSeconds"],
    )


def build(progress: Progress = print, *, rebuild: bool = False) -> BuiltImage:
    """Build the image from this checkout (or find it in the cache) and unpack its rootfs."""
    key = image_key()
    with _locked("image"):
        built = None if rebuild else find_built(key)
        if built is not None:
            progress(f"image: cached {built.name} in {built.folder}")
            return built
        t0 = time.monotonic()
        base = ensure_base(progress)
        try:
            return _build_on(base, key, t0, progress)
        finally:
            _tidy_storage(base)


def _build_on(base: str, key: str, t0: float, progress: Progress) -> BuiltImage:
    """Build on ``base``, export the layers and unpack them into the cache (under the lock)."""
    name = f"{IMAGE_NAME}:{key}"
    folder = cache_dir() / f"image-{key}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log = folder / "build.log"
    buildah = buildah_argv()
    secret = []
    if CA_BUNDLE.is_file():
        secret = ["--secret", f"id=ca,src={CA_BUNDLE}"]
    progress(f"image: buildah bud --isolation chroot on {base} (log: {log})")
    _run(
        [
            *buildah,
            "bud",
            "--isolation",
            "chroot",
            # No --layers: buildah 1.28 then commits each stage as one layer, and its layer
            # cache loses the build stage that a cached `RUN --mount=...,from=build` needs.
            "--pull=never",
            "--build-arg",
            f"PYTHON_IMAGE={base}",
            *secret,
            "-t",
            name,
            "-f",
            str(DOCKERFILE),
            str(ROOT),
        ],
        what="buildah bud",
        timeout=BUILD_TIMEOUT,
        log=log,
    )
    progress(f"image: built in {time.monotonic() - t0:.0f}s; exporting its layers")
    _run(
        [*buildah, "push", "-q", name, f"oci:{folder / 'oci'}:{key}"],
        what="buildah push (OCI layout)",
        timeout=STEP_TIMEOUT,
        log=log,
    )
    config, layers = read_layout(folder / "oci")
    unpack(folder / "oci", folder / "rootfs.partial")
    (folder / "rootfs.partial").rename(folder / "rootfs")
    # The OCI layout and rootfs are the build's product; buildah's copy would only pile up.
    subprocess.run(
        [*buildah, "rmi", name],
        capture_output=True,
        timeout=STEP_TIMEOUT,
        check=False,
        env=buildah_env(),
    )
    seconds = round(time.monotonic() - t0, 1)
    info = {
        "name": name,
        "config": config.get("config", {}),
        "layers": [layer.__dict__ for layer in layers],
        "buildSeconds": seconds,
    }
    (folder / "image.json").write_text(json.dumps(info, indent=2))
    _prune(keep=folder)
    built = find_built(key)
    assert built is not None
    progress(f"image: {name} ready in {seconds:.0f}s ({built.total_size / 1e6:.0f} MB)")
    return built


def _tidy_storage(base: str) -> None:
    """Leave only the current base in buildah's storage (it is ours alone): no working
    containers of a failed build, no dangling stage images, no base of an older recipe."""
    buildah = buildah_argv()
    listed = subprocess.run(
        [*buildah, "images", "--format", "{{.Name}}:{{.Tag}}"],
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
        env=buildah_env(),
    )
    # Each build removes its own image once exported: any other is left from an interrupted one.
    stale = [
        n
        for n in listed.stdout.split()
        if n.startswith((f"{BASE_NAME}:", f"{IMAGE_NAME}:")) and n != base
    ]
    for argv in (["rm", "--all"], ["rmi", *stale] if stale else [], ["rmi", "--prune"]):
        if argv:
            subprocess.run(
                [*buildah, *argv],
                capture_output=True,
                timeout=STEP_TIMEOUT,
                check=False,
                env=buildah_env(),
            )
    for old in cache_dir().glob("debian-base-*"):
        if old.name != f"debian-base-{base.rsplit(':', 1)[1]}":
            shutil.rmtree(old, ignore_errors=True)


def _prune(*, keep: Path) -> None:
    """Keep the newest few built images (another checkout may use an older one)."""
    others = sorted(
        (p for p in cache_dir().glob("image-*") if p.is_dir() and p != keep),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in others[KEEP_IMAGES - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


# --- OCI layout -------------------------------------------------------------------------------


def _blob(layout: Path, digest: str) -> Path:
    algo, hexdigest = digest.split(":", 1)
    return layout / "blobs" / algo / hexdigest


def read_layout(layout: Path) -> tuple[dict[str, Any], list[Layer]]:
    """The image config and its layers (with the instruction that made each) of an OCI layout
    holding one image."""
    index = json.loads((layout / "index.json").read_text())
    (desc,) = index["manifests"]
    manifest = json.loads(_blob(layout, desc["digest"]).read_text())
    config = json.loads(_blob(layout, manifest["config"]["digest"]).read_text())
    # buildah commits a stage as one layer, recorded under the stage's last instruction: name
    # each layer by the instructions that changed files since the previous layer.
    made: list[str] = []
    pending: list[str] = []
    for h in config.get("history", []):
        step = str(h.get("created_by", ""))
        if "#(nop)" not in step:
            pending.append(step)
        if not h.get("empty_layer"):
            made.append(" && ".join(pending) or step)
            pending = []
    layers = []
    for i, desc in enumerate(manifest["layers"]):
        created_by = made[i] if i < len(made) else ""
        layers.append(
            Layer(
                digest=desc["digest"],
                size=_uncompressed_size(_blob(layout, desc["digest"])),
                compressed_size=desc["size"],
                created_by=created_by,
            )
        )
    return config, layers


def _uncompressed_size(blob: Path) -> int:
    with blob.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    if not gzipped:
        return blob.stat().st_size
    total = 0
    with gzip.open(blob, "rb") as f:
        while chunk := f.read(1 << 20):
            total += len(chunk)
    return total


def layer_tars(layout: Path) -> Iterator[tuple[Layer, Path]]:
    _, layers = read_layout(layout)
    for layer in layers:
        yield layer, _blob(layout, layer.digest)


def _keep_modes(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    # tarfile's "tar" filter refuses paths that leave dest (also through a symlink the layers
    # made), but it clears setuid bits, which an image keeps: put the mode back.
    checked = tarfile.tar_filter(member, dest)
    return checked.replace(mode=member.mode, deep=False)


def unpack(layout: Path, dest: Path) -> None:
    """Apply the layers in order into ``dest``, honouring whiteouts (``.wh.name`` removes
    ``name``, ``.wh..wh..opq`` empties its folder), as a container runtime does."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for _, tar_path in layer_tars(layout):
        with tarfile.open(tar_path) as tar:
            members = []
            for m in tar:
                parent, _, base = m.name.rstrip("/").rpartition("/")
                if base == ".wh..wh..opq":
                    folder = dest / parent
                    if folder.is_dir() and not folder.is_symlink():
                        for child in folder.iterdir():
                            _remove(child)
                elif base.startswith(".wh."):
                    _remove(dest / parent / base.removeprefix(".wh."))
                else:
                    members.append(m)
            for m in members:
                # A file replaced by another type: remove the old one first.
                target = dest / m.name
                if target.is_symlink() or (target.exists() and not (m.isdir() and target.is_dir())):
                    _remove(target)
            # S202: the filter refuses members that would land outside dest.
            tar.extractall(dest, members=members, numeric_owner=True, filter=_keep_modes)  # noqa: S202
    dest.chmod(0o755)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --- reporting --------------------------------------------------------------------------------


def size_table(built: BuiltImage) -> str:
    """One line per layer (size, what made it) and the total, for humans."""
    lines = [f"{built.name}  ({built.folder})"]
    for layer in built.layers:
        what = " ".join(layer.created_by.split())[:90]
        lines.append(
            f"{layer.size / 1e6:9.1f} MB {layer.compressed_size / 1e6:9.1f} MB  "
            f"{layer.digest[7:19]}  {what}"
        )
    lines.append(
        f"{built.total_size / 1e6:9.1f} MB {built.compressed_size / 1e6:9.1f} MB  "
        f"total ({len(built.layers)} layers; uncompressed, compressed)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.image_build", description=__doc__)
    parser.add_argument("command", choices=["build", "sizes", "key"], nargs="?", default="build")
    parser.add_argument("--rebuild", action="store_true", help="ignore the cached image")
    args = parser.parse_args(argv)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.command == "key":
        print(image_key())
        return 0
    try:
        built = build(progress, rebuild=args.rebuild)
    except BuildError as e:
        progress(f"image build failed: {e}")
        return 1
    print(size_table(built) if args.command == "sizes" else built.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
