"""Test hosts in network namespaces: real, non-loopback addresses on this machine.

A real API server rejects loopback addresses in EndpointSlices, so tests that send real
traffic to Kubernetes-sourced endpoints put their backends on hosts made here: a network
namespace, a veth pair, 10.231.N.2/30 inside and 10.231.N.1/30 on our side. Needs root
(CI runs as root); every host made is removed again, by name.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.procs import http_get, wait_for

_SERVER = Path(__file__).with_name("named_http.py")
_numbers = itertools.count(0)


def available() -> str | None:
    """None when test hosts can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if shutil.which("ip") is None:
        return "needs iproute2 (apt-get install iproute2)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class NetnsHost:
    """One host with one HTTP backend that answers with its name."""

    def __init__(self, name: str, port: int = 8080) -> None:
        index = next(_numbers) + (os.getpid() % 50) * 64
        self.ns = f"cp{os.getpid()}-{index}"
        self.veth = f"cpv{index}"
        third, fourth = divmod(index, 64)
        self.address = f"10.231.{third}.{fourth * 4 + 2}"
        self.gateway = f"10.231.{third}.{fourth * 4 + 1}"
        self.name = name
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NetnsHost:
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
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=10)
