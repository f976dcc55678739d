"""The operator's image, built from this checkout and loaded into the session's sandbox.

Import ``operator_image`` into a test module that installs the operator (manifests, Helm chart):
from then on the sandbox's kubelet runs ``ghcr.io/connbudget/connbudget`` from the image's root
filesystem, not from this machine's virtual environment. The build is cached by content
(``sandbox.image_build``): cold ~3 min, warm well under a second.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import image_build, images
from sandbox.core import Sandbox


@pytest.fixture(scope="session")
def operator_image(sandbox: Sandbox) -> Iterator[image_build.BuiltImage]:
    """The built image, loaded into the sandbox for the session (unloaded afterwards)."""
    try:
        built = image_build.build(progress=lambda m: print(f"image build: {m}"))
    except image_build.BuildError as e:
        pytest.fail(f"the operator image did not build: {e}")
    image = images.rootfs_image(built.rootfs, built.config)
    images.load_image(sandbox.state_dir, images.OPERATOR_IMAGE, image)
    yield built
    images.unload_image(sandbox.state_dir, images.OPERATOR_IMAGE)


def assert_runs_in_image(pid: int, built: image_build.BuiltImage) -> None:
    """The process runs in the image's root filesystem: its root is an overlay on the unpacked
    image, its program is the image's, and this checkout (with its venv) is not visible."""
    root_mount = [
        line
        for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        if line.split()[4] == "/"
    ]
    assert root_mount, f"pid {pid} has no root mount"
    fstype, _, options = root_mount[0].split(" - ", 1)[1].split(" ", 2)
    assert fstype == "overlay", root_mount[0]
    assert f"lowerdir={built.rootfs}" in options, root_mount[0]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    program = Path(f"/proc/{pid}/root") / "usr/local/bin/connbudget"
    assert argv[1] == b"/usr/local/bin/connbudget", argv
    assert program.read_bytes() == (built.rootfs / "usr/local/bin/connbudget").read_bytes()
    assert not Path(f"/proc/{pid}/root{image_build.ROOT}").exists(), "the checkout is visible"
