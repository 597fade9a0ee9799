"""The captured lab's pods: one network namespace per demo app on a bridge of the lab's own.

A lab run leases a network number N (an exclusive ``flock`` on
``/run/controlplane-lab/N.lock``, held for the run) and makes the bridge ``cplab<N>br``
holding 10.240.N.1/24 (the host's side: the control plane's xDS listens there) and, per
pod, the namespace ``cplab-<N>-<pod>`` whose ``eth0`` (10.240.N.<i+2>/24, a veth into
the bridge, default route via the bridge) is all it has besides loopback. The pod's
``/etc/netns/<ns>/hosts`` maps the mesh's service names to their virtual IPs, which
``ip netns exec`` mounts over ``/etc/hosts``: that is how ``http://reviews:9080/``
resolves inside a pod to an address no process owns. The iptables rules that
``controlplane capture`` installs live in the pod's namespace and go with it.

The recipe (leases, bridge, pod plumbing, removal by prefix) is ``Layout``, which
tests/support/pods.py reuses with its own prefix, range and lease directory. What stays
apart: the tests' pods are named by index, leased per pytest worker and carry helpers to
call and assert; the lab's have names a person can type (``ip netns exec
cplab-0-reviews-v1 ...``), a range of their own (10.240/16, never the tests' 10.231 and
10.232) and a host FORWARD rule where bridged traffic would be dropped.

Everything is removed when the lab stops (Ctrl-C and SIGTERM included); what a lab
killed outright left behind is removed at the next lab's start (``sweep``), never a
network whose lease a live lab holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

PREFIX = "cplab"  # namespaces cplab-N-<pod>, bridge cplabNbr, host veths cplabNvI
NETWORKS = 256  # 10.240.N.0/24
MAX_PODS = 250
PROXY_UID = 1337
NETNS_ETC = Path("/etc/netns")
LEASES = Path("/run/controlplane-lab")


def unavailable() -> str | None:
    """None when the lab can make captured pods here, else why not (for its first line)."""
    if os.geteuid() != 0:
        return "not root: network namespaces and iptables need root"
    for tool, package in (("ip", "iproute2"), ("setpriv", "util-linux"),
                          ("iptables-restore", "iptables")):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH (apt-get install {package})"
    return None


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)


@dataclass(frozen=True)
class Layout:
    """One family of pod networks: the lab's (``cplab``, 10.240/16) or the tests'
    (tests/support/pods.py: ``cpp``, 10.232/16). Network N is the bridge ``<prefix>Nbr``
    holding ``<net>.N.1/24``, pods are namespaces ``<prefix>-N-<name>`` with veths
    ``<prefix>NvI``, and N is leased by an exclusive ``flock`` on ``<leases>/N.lock``.
    Each family keeps its own names, range and leases; they share only this recipe."""

    prefix: str
    net: str  # the first two octets: "10.240"
    leases: Path
    hint: str  # what to do when an ``ip`` command fails, for the error message

    def lock(self, number: int) -> IO[bytes] | None:
        """The open file whose lock holds ``number``, or None when another process has it."""
        self.leases.mkdir(parents=True, exist_ok=True)
        handle = open(self.leases / f"{number}.lock", "ab")  # noqa: SIM115 (held by caller)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        return handle

    def lease(self, start: int = 0) -> tuple[int, IO[bytes]] | None:
        """The first free number from ``start`` on (wrapping), or None when all are held."""
        for step in range(NETWORKS):
            number = (start + step) % NETWORKS
            handle = self.lock(number)
            if handle is not None:
                return number, handle
        return None

    def ip(self, *args: str) -> None:
        result = _run("ip", *args)
        if result.returncode != 0:
            raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}; {self.hint}")

    def namespaces(self, number: int | None = None) -> list[str]:
        """Our namespaces, all or one network's (``ip netns list``: ``name (id: 3)``)."""
        pattern = re.compile(rf"^{self.prefix}-(\d+)-\S+$")
        found = []
        for line in _run("ip", "netns", "list").stdout.splitlines():
            name = line.split()[0] if line.strip() else ""
            match = pattern.match(name)
            if match and (number is None or int(match.group(1)) == number):
                found.append(name)
        return found

    def links(self, number: int | None = None) -> list[str]:
        which = str(number) if number is not None else r"\d+"
        text = _run("ip", "-o", "link", "show").stdout
        return re.findall(rf"^\d+: ({self.prefix}{which}(?:br|v\d+))[@:]", text, re.MULTILINE)

    def numbers(self) -> set[int]:
        """The numbers of every network something of ours exists for (live or left)."""
        found = {int(ns.split("-")[1]) for ns in self.namespaces()}
        found |= {int(re.sub(r"\D.*", "", link[len(self.prefix):])) for link in self.links()}
        found |= {int(p.name.split("-")[1]) for p in NETNS_ETC.glob(f"{self.prefix}-*-*")
                  if p.name.split("-")[1].isdigit()}
        return found

    def remove(self, number: int) -> None:
        """Processes in one network's pods (a namespace with a live process outlives
        ``ip netns del``), the pods, their hosts files, the veths and the bridge."""
        for ns in self.namespaces(number):
            for pid in _run("ip", "netns", "pids", ns).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "del", ns)
        for path in NETNS_ETC.glob(f"{self.prefix}-{number}-*"):
            shutil.rmtree(path, ignore_errors=True)
        for link in self.links(number):
            _run("ip", "link", "del", link)

    def make_bridge(self, number: int) -> None:
        bridge, gateway = f"{self.prefix}{number}br", f"{self.net}.{number}.1"
        # A fixed MAC: a bridge otherwise takes its lowest port's, so every new pod could
        # change it under the pods that already resolved the gateway (stale ARP: their
        # packets to the control plane vanish until the entry expires).
        octets = ":".join(f"{int(part):02x}" for part in self.net.split("."))
        self.ip("link", "add", bridge, "address", f"02:00:{octets}:{number:02x}:01",
                "type", "bridge")
        self.ip("addr", "add", f"{gateway}/24", "dev", bridge)
        self.ip("link", "set", bridge, "up")

    def address(self, number: int, index: int) -> str:
        return f"{self.net}.{number}.{index + 2}"

    def make_pod(self, number: int, index: int, ns: str, name: str,
                 hosts: Mapping[str, str]) -> None:
        """Pod ``ns`` at ``address(number, index)`` on network ``number``'s bridge;
        ``hosts`` (name -> IP) resolve in it, as does ``name``."""
        address, veth = self.address(number, index), f"{self.prefix}{number}v{index}"
        etc = NETNS_ETC / ns
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost", f"{address} {name}"]
        lines += [f"{ip} {host}" for host, ip in hosts.items()]
        (etc / "hosts").write_text("\n".join(lines) + "\n", encoding="utf-8")
        # No DNS server in a pod: a name not in its hosts file fails at once.
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
                                         encoding="utf-8")
        self.ip("netns", "add", ns)
        self.ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.ip("link", "set", veth, "master", f"{self.prefix}{number}br", "up")
        self.ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        self.ip("-n", ns, "link", "set", "eth0", "up")
        self.ip("-n", ns, "link", "set", "lo", "up")
        self.ip("-n", ns, "route", "add", "default", "via", f"{self.net}.{number}.1")


LAB = Layout(PREFIX, "10.240", LEASES, "`controlplane lab --explicit` runs without network "
             "namespaces")
_lock = LAB.lock


def _forward_rule(number: int) -> list[str]:
    bridge = f"{PREFIX}{number}br"
    return ["FORWARD", "-i", bridge, "-o", bridge, "-m", "comment", "--comment",
            f"controlplane lab {number}: pod to pod on its bridge", "-j", "ACCEPT"]


def forwarding_blocked() -> bool:
    """Bridged traffic passes the host's FORWARD chain (br_netfilter) and its policy is
    not ACCEPT (as on a Docker host): pod to pod calls would be dropped."""
    try:
        calls = Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip()
    except OSError:
        return False
    if shutil.which("iptables") is None:
        return False
    policy = _run("iptables", "-S", "FORWARD").stdout.splitlines()[:1]
    return calls == "1" and policy != ["-P FORWARD ACCEPT"]


def allow_bridged(number: int) -> None:
    """One host rule letting the lab's pods reach each other; ``remove`` takes it away."""
    result = _run("iptables", "-I", *_forward_rule(number))
    if result.returncode != 0:
        raise OSError(f"iptables -I {' '.join(_forward_rule(number))}: "
                      f"{result.stderr.strip()}; run `controlplane lab --explicit`")


def remove(number: int) -> None:
    """Everything of one network: its host FORWARD rule, then its processes, pods, hosts
    files, veths and bridge (``Layout.remove``)."""
    for _ in range(8 if shutil.which("iptables") else 0):  # one a run; more after crashes
        if _run("iptables", "-D", *_forward_rule(number)).returncode != 0:
            break
    LAB.remove(number)


def sweep() -> list[int]:
    """Remove what labs that died without cleaning up left behind; a network whose lease a
    live lab holds is left alone. Returns the numbers removed."""
    numbers = LAB.numbers()
    if shutil.which("iptables") is not None:
        rules = _run("iptables", "-S", "FORWARD").stdout
        numbers |= {int(n) for n in re.findall(r'"controlplane lab (\d+):', rules)}
    removed = []
    for number in sorted(numbers):
        handle = LAB.lock(number)
        if handle is None:
            continue
        try:
            remove(number)
            removed.append(number)
        finally:
            handle.close()
    return removed


@dataclass(frozen=True)
class Pod:
    name: str
    ns: str
    address: str

    def argv(self, command: list[str], uid: int | None = None) -> list[str]:
        """``command`` run in the pod (as ``uid``, groups cleared, when given). ``ip netns
        exec`` and ``setpriv`` exec in place: the child's PID is the command's own."""
        prefix = ["ip", "netns", "exec", self.ns]
        if uid is not None:
            prefix += ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
                       "--"]
        return [*prefix, *command]


class Network:
    """The lab's bridge and pods. ``open()`` sweeps leftovers, leases a number and makes
    the bridge; ``close()`` removes everything (safe to call twice, or after a failed
    ``open``)."""

    def __init__(self) -> None:
        self.number = -1
        self.pods: list[Pod] = []
        self._lease: IO[bytes] | None = None

    @property
    def gateway(self) -> str:
        return f"10.240.{self.number}.1"

    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.number}br"

    @property
    def subnet(self) -> str:
        return f"10.240.{self.number}.0/24"

    def open(self) -> list[int]:
        """Make the bridge; returns the numbers of crashed labs' networks it removed."""
        swept = sweep()
        leased = LAB.lease()
        if leased is None:
            raise OSError(f"all {NETWORKS} lab networks (10.240.0.0/16) are in use by "
                          "other labs; stop one, or run `controlplane lab --explicit`")
        self.number, self._lease = leased
        remove(self.number)
        LAB.make_bridge(self.number)
        if forwarding_blocked():
            allow_bridged(self.number)
        return swept

    def pod(self, name: str, hosts: Mapping[str, str]) -> Pod:
        """A new pod on the bridge; ``hosts`` (name -> IP) resolve in it, as does its name."""
        index = len(self.pods)
        if index >= MAX_PODS:
            raise OSError(f"a lab network holds at most {MAX_PODS} pods")
        pod = Pod(name, f"{PREFIX}-{self.number}-{name}", LAB.address(self.number, index))
        self.pods.append(pod)
        LAB.make_pod(self.number, index, pod.ns, name, hosts)
        return pod

    def close(self) -> None:
        if self._lease is None:
            return
        remove(self.number)
        self._lease.close()
        self._lease = None
        self.pods.clear()
