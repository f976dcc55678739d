"""The sandbox kubelet's pure helpers: image names, $(VAR) expansion, fieldRefs, pod addresses."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox.images import image_key
from sandbox.kubelet import _expand, _field_ref
from sandbox.network import LOOPBACK, MAX_SLOTS, NETNS, PodNetwork


@pytest.mark.parametrize(
    ("image", "key"),
    [
        pytest.param("sandbox.local/leaky-app:dev", "sandbox.local/leaky-app", id="tag"),
        pytest.param("sandbox.local/leaky-app", "sandbox.local/leaky-app", id="no-tag"),
        pytest.param("registry:5000/team/app:1.2", "registry:5000/team/app", id="port-and-tag"),
        pytest.param("registry:5000/team/app", "registry:5000/team/app", id="port-no-tag"),
        pytest.param("app@sha256:abc", "app", id="digest"),
    ],
)
def test_image_key_strips_tag_and_digest_but_not_a_registry_port(image: str, key: str) -> None:
    assert image_key(image) == key


def test_expand_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "two"}
    assert _expand("$(A)-$(B)", env) == "1-two"
    assert _expand("$(MISSING)", env) == "$(MISSING)"
    assert _expand("$$(A)", env) == "$(A)"
    assert _expand("plain $A", env) == "plain $A"


POD: dict[str, Any] = {
    "metadata": {
        "name": "web-1",
        "namespace": "shop",
        "uid": "u-1",
        "labels": {"app": "web"},
        "annotations": {"note": "x"},
    },
    "spec": {"serviceAccountName": "web"},
}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("metadata.name", "web-1"),
        ("metadata.namespace", "shop"),
        ("metadata.uid", "u-1"),
        ("status.podIP", "198.18.0.7"),
        ("status.hostIP", "198.18.0.1"),
        ("spec.serviceAccountName", "web"),
        ("metadata.labels['app']", "web"),
        ("metadata.annotations['note']", "x"),
        ("metadata.labels['absent']", ""),
    ],
)
def test_field_refs_resolve_like_the_kubelet(path: str, value: str) -> None:
    assert _field_ref(POD, path, "198.18.0.7", "198.18.0.1") == value


def test_unknown_field_ref_is_an_error() -> None:
    with pytest.raises(ValueError, match="unsupported fieldRef"):
        _field_ref(POD, "status.phase", "198.18.0.7", "198.18.0.1")


def test_pod_addresses_stay_inside_the_sandbox_range_and_are_distinct() -> None:
    net = PodNetwork(mode=NETNS, index=3)
    assert net.host_ip == "198.18.12.1"
    ips = {net.pod_ip(s) for s in range(1, MAX_SLOTS + 1)}
    assert len(ips) == MAX_SLOTS
    assert net.host_ip not in ips
    assert all(ip.startswith("198.18.1") for ip in ips)
    with pytest.raises(ValueError, match="outside"):
        net.pod_ip(MAX_SLOTS + 1)


def test_loopback_mode_shares_one_address() -> None:
    net = PodNetwork(mode=LOOPBACK, index=-1)
    assert net.host_ip == net.pod_ip(5) == "127.0.0.1"
    assert net.exec_prefix(5) == []


def test_a_reused_pod_address_gets_the_same_mac() -> None:
    net = PodNetwork(mode=NETNS, index=0)
    assert net.pod_mac(1) == "02:cb:c6:12:00:02" == PodNetwork(mode=NETNS, index=0).pod_mac(1)
    assert len({net.pod_mac(s) for s in range(1, 300)}) == 299


def test_each_sandbox_bridge_has_its_own_fixed_mac() -> None:
    macs = {PodNetwork(mode=NETNS, index=i).bridge_mac for i in range(128)}
    assert len(macs) == 128
    assert all(m.startswith("02:") for m in macs)  # locally administered
