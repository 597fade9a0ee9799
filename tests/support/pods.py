"""Test "pods": network namespaces on a bridge, for capture and injection end-to-end tests.

A ``PodNetwork`` is one Linux bridge ``cpp<N>br`` holding 10.232.N.1/24 (the gateway: the
host's side, where a test's control plane listens) and, per ``pod()``, one network
namespace ``cpp-<N>-<i>`` with ``eth0`` at 10.232.N.<i+2>/24 on a veth into the bridge and a
default route via the gateway. Pods reach each other and the gateway directly; a name in a
pod's ``hosts`` is written to ``/etc/netns/<ns>/hosts``, which ``ip netns exec`` mounts
over ``/etc/hosts``, so a test can map ``reviews`` to a ClusterIP that no process owns
(there is no DNS server: ``resolv.conf`` points at the pod's own loopback, so an unknown
name fails at once).

The recipe (leases, bridge, pod plumbing, removal) is controlplane/lab/pods.py's ``Layout``
with the tests' own prefix, range and lease directory. Network numbers are leased by an
exclusive ``flock`` per number, held while the network lives, so parallel
workers (``-n 4``) and concurrent runs never share one. Whatever a crashed run left under
a number (processes in its namespaces, the namespaces, the bridge, the hosts files) is
removed when that number is leased again, or by ``sweep()``. Needs root and iproute2:
``available()`` says why not otherwise, for ``pytest.skip``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from controlplane.lab import pods as lab_pods
from controlplane.lab.envoy import find_envoy
from tests.support.procs import wait_for

_PODS = 250  # 10.232.N.2 .. 10.232.N.251
_PREFIX = "cpp"  # namespaces cpp-N-i, bridges cppNbr, host-side veths cppNvI: ours alone
PROXY_UID = 1337
_ECHO = Path(__file__).with_name("tcp_echo.py")
_LEASES = Path("/run" if os.access("/run", os.W_OK) else "/tmp") / "controlplane-test-pods"
_LAYOUT = lab_pods.Layout(_PREFIX, "10.232", _LEASES, "test pods need root and iproute2")


def available() -> str | None:
    """None when pods can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root for ip netns and iptables"
    for tool in ("ip", "setpriv"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install iproute2 util-linux)"
    return None


def capture_available() -> str | None:
    """None when ``controlplane capture`` can run in pods here, else the reason not."""
    reason = available()
    if reason is None and shutil.which("iptables-restore") is None:
        reason = "needs iptables (apt-get install iptables)"
    return reason


def lease() -> tuple[int, IO[bytes]]:
    """A network number no other process holds, and the open file whose lock holds it."""
    leased = _LAYOUT.lease(start=(os.getpid() * 97) % lab_pods.NETWORKS)
    if leased is None:
        raise RuntimeError(f"all {lab_pods.NETWORKS} test pod networks are in use")
    return leased


def sweep() -> list[int]:
    """Remove what crashed runs left behind: only numbers no live process holds, so a
    concurrent run keeps its own. Returns the network numbers cleaned."""
    if available() is not None:
        return []
    cleaned = []
    for number in sorted(_LAYOUT.numbers()):
        handle = _LAYOUT.lock(number)
        if handle is None:
            continue  # a live network
        try:
            _LAYOUT.remove(number)
            cleaned.append(number)
        finally:
            handle.close()
    return cleaned


class Pod:
    """One pod: a network namespace with ``eth0`` on the bridge. Processes started here
    are ended when the network closes."""

    def __init__(self, network: PodNetwork, name: str, ns: str, address: str) -> None:
        self.network = network
        self.name = name
        self.ns = ns
        self.address = address
        self.envoy_log: Path | None = None

    def _argv(self, argv: Sequence[str], uid: int | None) -> list[str]:
        prefix = ["ip", "netns", "exec", self.ns]
        if uid is not None:
            prefix += ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
                       "--"]
        return [*prefix, *argv]

    def run(self, argv: Sequence[str], uid: int | None = None,
            **popen: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the pod (as ``uid`` when given, groups cleared). ``ip netns
        exec`` and ``setpriv`` exec in place, so the handle's PID is the process itself."""
        popen.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[bytes] = subprocess.Popen(self._argv(argv, uid), **popen)
        self.network.procs.append(proc)
        return proc

    def call(self, argv: Sequence[str], timeout: float = 10, uid: int | None = None,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the pod to completion; output captured as text, never raises on
        a non-zero exit (the caller asserts on it)."""
        return subprocess.run(self._argv(argv, uid), capture_output=True, text=True,
                              timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)

    def capture(self, *args: str) -> None:
        """``controlplane capture ARGS`` in the pod, as root; raises with its output when
        it fails."""
        result = self.call([sys.executable, "-m", "controlplane", "capture", *args], timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"controlplane capture {' '.join(args)} in pod {self.name} "
                               f"exited {result.returncode}: {result.stderr.strip()}")

    def envoy(self, bootstrap_yaml: str, log_level: str = "warning") -> subprocess.Popen[bytes]:
        """A real Envoy in the pod, as UID 1337 (which capture leaves alone). Its log is
        ``self.envoy_log``. Readiness is the caller's to wait for (e.g. its admin, bound
        on the pod address on a port capture excludes)."""
        directory = self.network.workdir
        config = directory / f"{self.name}-envoy.yaml"
        config.write_text(bootstrap_yaml)
        config.chmod(0o644)
        self.envoy_log = directory / f"{self.name}-envoy.log"
        with open(self.envoy_log, "ab") as log:
            return self.run([find_envoy(), "-c", str(config), "--disable-hot-restart",
                             "--concurrency", "1", "--log-level", log_level,
                             "--drain-time-s", "1"],
                            uid=PROXY_UID, stdout=log, stderr=subprocess.STDOUT)

    def serve_tcp(self, port: int, name: str | None = None,
                  address: str = "0.0.0.0") -> subprocess.Popen[bytes]:
        """A TCP echo in the pod (tests/support/tcp_echo.py), ready when this returns.
        With ``name``, each connection first gets ``NAME ORIGINAL_DST LOCAL PEER``."""
        proc = self.run([sys.executable, str(_ECHO), address, str(port), *([name] if name else [])],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = self.address if address == "0.0.0.0" else address  # root: never captured
        wait_for(lambda: self.tcp_connect(target, port, send="ping").startswith(
            f"{name} " if name else "ping"), what=f"TCP {name or 'echo'} on {self.name} "
                 f"{address}:{port}")
        return proc

    def tcp_connect(self, host: str, port: int, uid: int | None = None, bind: str | None = None,
                    send: str | None = None) -> str:
        """The first line a TCP connection from this pod gets back (a named echo's banner,
        or the echo of ``send``), or ``error: ...`` when none comes."""
        argv = [sys.executable, str(_ECHO), "connect", host, str(port)]
        argv += ["--bind", bind] if bind else []
        argv += ["--send", send] if send is not None else []
        result = self.call(argv, uid=uid)
        if result.returncode != 0:
            return f"error: {result.stderr.strip()}"
        return result.stdout.strip()

    def http_get(self, url: str, headers: Mapping[str, str] | None = None, timeout: float = 5,
                 uid: int | None = None) -> tuple[int, str]:
        """GET ``url`` from inside the pod (curl; names resolve through the pod's hosts
        file). ``(status, body)``; ``(0, curl's error)`` when no HTTP response came."""
        argv = ["curl", "-sS", "--max-time", str(timeout), "-o", "-", "-w", "\n%{http_code}"]
        for name, value in (headers or {}).items():
            argv += ["-H", f"{name}: {value}"]
        result = self.call([*argv, url], timeout=timeout + 5, uid=uid)
        body, _, status = result.stdout.rpartition("\n")
        code = int(status) if status.isdigit() else 0
        return (code, body) if code else (0, result.stderr.strip())


class PodNetwork:
    """A bridge of pods (see the module docstring). A context manager: leaving it ends
    every process started in its pods and removes the pods, bridge and hosts files."""

    def __init__(self) -> None:
        self.number, self._lease = lease()
        self.gateway = f"10.232.{self.number}.1"
        self.bridge = f"{_PREFIX}{self.number}br"
        self.pods: list[Pod] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workdir = Path(tempfile.mkdtemp(prefix=f"controlplane-pods-{self.number}-"))
        self.workdir.chmod(0o755)  # Envoy runs as UID 1337 and reads its bootstrap here

    def __enter__(self) -> PodNetwork:
        try:
            _LAYOUT.remove(self.number)  # left by a run that crashed holding this number
            _LAYOUT.make_bridge(self.number)  # with a fixed MAC (see Layout.make_bridge)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def pod(self, name: str, hosts: Mapping[str, str] | None = None) -> Pod:
        """A new pod on the bridge; ``hosts`` (name -> IP) resolve inside it, and so does
        its own name."""
        index = len(self.pods)
        if index >= _PODS:
            raise RuntimeError(f"a test pod network holds at most {_PODS} pods")
        ns = f"{_PREFIX}-{self.number}-{index}"
        pod = Pod(self, name, ns, _LAYOUT.address(self.number, index))
        self.pods.append(pod)  # before creating, so close() removes a half-made pod
        _LAYOUT.make_pod(self.number, index, ns, name, hosts or {})
        return pod

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        _LAYOUT.remove(self.number)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if not self._lease.closed:
            self._lease.close()
