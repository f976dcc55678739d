"""The sandbox's pod network: a bridge on the host and one network namespace per pod.

In ``netns`` mode (root and iproute2 available), each sandbox owns a /22 inside 198.18.0.0/15, the
range reserved for network benchmarks (RFC 2544), so it never collides with a real network. The
bridge holds the host address ``.1``; PostgreSQL, PgBouncer and the API server listen on it, so pods
reach them and PostgreSQL sees each pod's own address as ``client_addr``. Pod addresses are handed
out lowest-first, so a new pod may get the address a dead pod had (as in a real cluster).

In ``loopback`` mode (no root, or ``CONNBUDGET_SANDBOX_NETWORK=loopback``), pods are plain local
processes sharing 127.0.0.1; attribution then has to go by ``application_name``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
from dataclasses import dataclass

from sandbox.procs import run

NETNS = "netns"
LOOPBACK = "loopback"
SUPERNET = ipaddress.ip_network("198.18.0.0/15")
PREFIX = 22  # each sandbox gets a /22: room for 1,021 pods
MAX_SLOTS = 2 ** (32 - PREFIX) - 3  # minus network, host and broadcast addresses
_BRIDGE_RE = re.compile(r"^cbbr(\d+)$")


def choose_mode() -> str:
    """Pick the network mode: ``CONNBUDGET_SANDBOX_NETWORK`` if set, else netns when possible."""
    wanted = os.environ.get("CONNBUDGET_SANDBOX_NETWORK", "auto")
    if wanted not in ("auto", NETNS, LOOPBACK):
        raise ValueError(
            f"CONNBUDGET_SANDBOX_NETWORK must be auto, netns or loopback, not {wanted!r}"
        )
    if wanted != "auto":
        return wanted
    return NETNS if netns_available() else LOOPBACK


def netns_available() -> bool:
    """Tell whether this process may create network namespaces (root, iproute2, kernel)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"cbprobe-{os.getpid()}"
    ok = run(["ip", "netns", "add", probe], check=False).returncode == 0
    run(["ip", "netns", "delete", probe], check=False)
    return ok


@dataclass(frozen=True)
class PodNetwork:
    """One sandbox's network: its mode, its bridge and subnet (netns mode) and its host address."""

    mode: str
    index: int  # which /22 of 198.18.0.0/15 (0..127); -1 in loopback mode

    @property
    def host_ip(self) -> str:
        """The address pods use to reach services on the host."""
        return "127.0.0.1" if self.mode == LOOPBACK else str(self._subnet()[1])

    @property
    def bridge(self) -> str:
        return f"cbbr{self.index}"

    def pod_ip(self, slot: int) -> str:
        """The address of pod slot ``slot`` (1-based; the host has the first address)."""
        if self.mode == LOOPBACK:
            return "127.0.0.1"
        if not 1 <= slot <= MAX_SLOTS:
            raise ValueError(f"pod slot {slot} outside 1..{MAX_SLOTS}")
        return str(self._subnet()[slot + 1])

    def netns_name(self, slot: int) -> str:
        return f"cb{self.index}-p{slot}"

    def _veth(self, slot: int) -> str:
        return f"cbv{self.index}-{slot}"

    def _subnet(self) -> ipaddress.IPv4Network:
        return list(SUPERNET.subnets(new_prefix=PREFIX))[self.index]  # type: ignore[return-value]

    @classmethod
    def create(cls, mode: str) -> PodNetwork:
        """Create the bridge for a new sandbox (netns mode) on the first free /22."""
        if mode == LOOPBACK:
            return cls(mode=LOOPBACK, index=-1)
        used = {int(m.group(1)) for name in _links() if (m := _BRIDGE_RE.match(name))}
        index = next(i for i in range(2 ** (PREFIX - SUPERNET.prefixlen)) if i not in used)
        net = cls(mode=NETNS, index=index)
        # A bridge takes the lowest MAC of its ports unless given one: it would change whenever a
        # pod's veth comes or goes, and the pods' cached MAC for the host address go stale.
        run(["ip", "link", "add", net.bridge, "address", net.bridge_mac, "type", "bridge"])
        run(["ip", "addr", "add", f"{net.host_ip}/{PREFIX}", "dev", net.bridge])
        run(["ip", "link", "set", net.bridge, "up"])
        return net

    def add_pod(self, slot: int) -> None:
        """Create pod slot ``slot``'s network namespace and veth, with its address and route."""
        if self.mode == LOOPBACK:
            return
        ns, veth = self.netns_name(slot), self._veth(slot)
        self.remove_pod(slot)
        run(["ip", "netns", "add", ns])
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        run(["ip", "link", "set", veth, "master", self.bridge])
        run(["ip", "link", "set", veth, "up"])
        # A pod IP is reused once its pod is gone: giving the address a fixed MAC keeps the host's
        # neighbour cache right, else replies to the new pod go to the dead pod's MAC for a while.
        run(["ip", "-n", ns, "link", "set", "eth0", "address", self.pod_mac(slot)])
        run(["ip", "neigh", "flush", "to", self.pod_ip(slot), "dev", self.bridge])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", ns, "addr", "add", f"{self.pod_ip(slot)}/{PREFIX}", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        run(["ip", "-n", ns, "route", "add", "default", "via", self.host_ip])

    @property
    def bridge_mac(self) -> str:
        """A fixed, locally administered MAC for the bridge (the host's address on it)."""
        return f"02:cb:fe:00:{self.index >> 8:02x}:{self.index & 0xFF:02x}"

    def pod_mac(self, slot: int) -> str:
        """A locally administered MAC derived from the pod's address."""
        octets = [int(o) for o in self.pod_ip(slot).split(".")]
        return "02:cb:" + ":".join(f"{o:02x}" for o in octets)

    def exec_prefix(self, slot: int) -> list[str]:
        """The argv prefix that runs a command inside pod slot ``slot``'s namespace."""
        return [] if self.mode == LOOPBACK else ["ip", "netns", "exec", self.netns_name(slot)]

    def remove_pod(self, slot: int) -> None:
        """Delete pod slot ``slot``'s namespace and veth (deleting one end removes the pair)."""
        if self.mode == LOOPBACK:
            return
        run(["ip", "netns", "delete", self.netns_name(slot)], check=False)
        run(["ip", "link", "delete", self._veth(slot)], check=False)

    def destroy(self) -> list[str]:
        """Delete every namespace, veth and the bridge of this sandbox; return what was removed."""
        if self.mode == LOOPBACK:
            return []
        removed: list[str] = []
        prefix = f"cb{self.index}-p"
        for ns in list_netns():
            if ns.startswith(prefix):
                run(["ip", "netns", "delete", ns], check=False)
                removed.append(f"netns/{ns}")
        for link in _links():
            if link.startswith(f"cbv{self.index}-") or link == self.bridge:
                run(["ip", "link", "delete", link], check=False)
                removed.append(f"link/{link}")
        return removed

    def leftovers(self) -> list[str]:
        """Name every namespace or link of this sandbox that still exists."""
        if self.mode == LOOPBACK:
            return []
        found = [f"netns/{n}" for n in list_netns() if n.startswith(f"cb{self.index}-p")]
        found += [
            f"link/{n}" for n in _links() if n.startswith(f"cbv{self.index}-") or n == self.bridge
        ]
        return found


def list_netns() -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(os.listdir("/run/netns"))
    return []


def _links() -> list[str]:
    res = run(["ip", "-o", "link", "show"], check=False)
    names = []
    for line in res.stdout.splitlines():
        parts = line.split(": ", 2)
        if len(parts) >= 2:
            names.append(parts[1].split("@", 1)[0])
    return names
