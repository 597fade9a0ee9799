"""Test hosts in network namespaces: real, non-loopback addresses on this machine.

A real API server rejects loopback addresses in EndpointSlices, so tests that send real
traffic to Kubernetes-sourced endpoints put their backends on hosts made here: a network
namespace, a veth pair, 10.231.N.2/30 inside and 10.231.N.1/30 on our side. Needs root
(CI runs as root); every host made is removed again, by name.

Host numbers are leased, not derived: each is an exclusive ``flock`` on its own file under
``/run/controlplane-test-hosts`` (or ``/tmp``), held while the host lives, so parallel
workers and concurrent runs never share one, and a crashed run's leases go with its
process. A host left behind by such a run (same number, so same names) is deleted when
its number is leased again.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import IO

from tests.support.procs import http_get, wait_for

_SERVER = Path(__file__).with_name("named_http.py")
_HOSTS = 64 * 256  # 10.231.0.0/16 in /30s
_PREFIX = "cpt"  # namespaces cpt-N, host-side veths cptvN: ours alone


def _lease_dir() -> Path:
    for base in ("/run", "/tmp"):
        if os.access(base, os.W_OK):
            path = Path(base) / "controlplane-test-hosts"
            path.mkdir(exist_ok=True)
            return path
    raise RuntimeError("no writable /run or /tmp for test host leases")


def lease() -> tuple[int, IO[bytes]]:
    """A host number no other process holds, and the open file whose lock holds it
    (closing the file frees the number). Starts at a per-process offset, so parallel
    workers rarely contend for the same file."""
    directory = _lease_dir()
    start = (os.getpid() * 97) % _HOSTS
    for step in range(_HOSTS):
        number = (start + step) % _HOSTS
        handle = open(directory / f"{number}.lock", "ab")  # noqa: SIM115 (held by caller)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return number, handle
    raise RuntimeError(f"all {_HOSTS} test host numbers are in use")


def available() -> str | None:
    """None when test hosts can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "needs iproute2 (apt-get install iproute2)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def sweep() -> list[str]:
    """Delete the test hosts that crashed runs left behind: ours by name prefix, and only
    those whose number no live process holds (so a concurrent run keeps its own).
    Returns the namespaces deleted."""
    if available() is not None:
        return []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            timeout=10).stdout
    directory = _lease_dir()
    deleted = []
    for name in (line.split()[0] for line in listed.splitlines() if line.strip()):
        number = name.removeprefix(f"{_PREFIX}-")
        if name == number or not number.isdigit():
            continue
        with open(directory / f"{number}.lock", "ab") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live test holds it
            subprocess.run(["ip", "link", "del", f"{_PREFIX}v{number}"], capture_output=True,
                           timeout=10)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
            deleted.append(name)
    return deleted


class NetnsHost:
    """One host with one HTTP backend that answers with its name."""

    def __init__(self, name: str, port: int = 8080) -> None:
        index, self._lease = lease()
        self.ns = f"{_PREFIX}-{index}"
        self.veth = f"{_PREFIX}v{index}"
        third, fourth = divmod(index, 64)
        self.address = f"10.231.{third}.{fourth * 4 + 2}"
        self.gateway = f"10.231.{third}.{fourth * 4 + 1}"
        self.name = name
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NetnsHost:
        self._remove()  # left by a run that crashed while it held this number
        _ip("netns", "add", self.ns)
        try:
            _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
            _ip("addr", "add", f"{self.gateway}/30", "dev", self.veth)
            _ip("link", "set", self.veth, "up")
            _ip("-n", self.ns, "addr", "add", f"{self.address}/30", "dev", "eth0")
            _ip("-n", self.ns, "link", "set", "eth0", "up")
            _ip("-n", self.ns, "link", "set", "lo", "up")
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, str(_SERVER),
                 self.address, str(self.port), self.name],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            wait_for(lambda: http_get(f"http://{self.address}:{self.port}/")[1] == self.name,
                     timeout=10, what=f"backend {self.name} on {self.address}")
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._remove()
        if not self._lease.closed:
            self._lease.close()

    def _remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=10)


class Namespace:
    """A network namespace of our own with only loopback up: the documented ports are
    free in it whatever runs on this machine. ``run`` gives the command prefix."""

    def __init__(self) -> None:
        index, self._lease = lease()
        self.ns = f"{_PREFIX}-{index}"

    def __enter__(self) -> Namespace:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=10)
        _ip("netns", "add", self.ns)
        _ip("-n", self.ns, "link", "set", "lo", "up")
        return self

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def __exit__(self, *_: object) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=10)
        self._lease.close()
