"""Test "pods": network namespaces on a bridge, for capture and injection end-to-end tests.

A ``PodNetwork`` is one Linux bridge ``cpp<N>br`` holding 10.232.N.1/24 (the gateway: the
host's side, where a test's control plane listens) and, per ``pod()``, one network
namespace ``cpp-<N>-<i>`` with ``eth0`` at 10.232.N.<i+2>/24 on a veth into the bridge and a
default route via the gateway. Pods reach each other and the gateway directly; a name in a
pod's ``hosts`` is written to ``/etc/netns/<ns>/hosts``, which ``ip netns exec`` mounts
over ``/etc/hosts``, so a test can map ``reviews`` to a ClusterIP that no process owns
(there is no DNS server: ``resolv.conf`` points at the pod's own loopback, so an unknown
name fails at once).

Network numbers are leased like tests/support/netns.py (an exclusive ``flock`` per number,
held while the network lives), from a range and a name prefix of their own, so parallel
workers (``-n 4``) and concurrent runs never share one. Whatever a crashed run left under
a number (processes in its namespaces, the namespaces, the bridge, the hosts files) is
removed when that number is leased again, or by ``sweep()``. Needs root and iproute2:
``available()`` says why not otherwise, for ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from controlplane.lab.envoy import find_envoy
from tests.support.procs import wait_for

_NETWORKS = 256  # 10.232.N.0/24
_PODS = 250  # 10.232.N.2 .. 10.232.N.251
_PREFIX = "cpp"  # namespaces cpp-N-i, bridges cppNbr, host-side veths cppNvI: ours alone
_NETNS_ETC = Path("/etc/netns")
PROXY_UID = 1337
_ECHO = Path(__file__).with_name("tcp_echo.py")


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


def _lease_dir() -> Path:
    for base in ("/run", "/tmp"):
        if os.access(base, os.W_OK):
            path = Path(base) / "controlplane-test-pods"
            path.mkdir(exist_ok=True)
            return path
    raise RuntimeError("no writable /run or /tmp for test pod network leases")


def _try_lock(number: int) -> IO[bytes] | None:
    handle = open(_lease_dir() / f"{number}.lock", "ab")  # noqa: SIM115 (held by caller)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def lease() -> tuple[int, IO[bytes]]:
    """A network number no other process holds, and the open file whose lock holds it."""
    start = (os.getpid() * 97) % _NETWORKS
    for step in range(_NETWORKS):
        number = (start + step) % _NETWORKS
        handle = _try_lock(number)
        if handle is not None:
            return number, handle
    raise RuntimeError(f"all {_NETWORKS} test pod networks are in use")


def _run(*argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=10)


def _ip(*args: str) -> None:
    result = _run("ip", *args)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _our_namespaces(number: int | None = None) -> list[str]:
    """Our namespaces, all or one network's (``ip netns list`` prints ``name (id: 3)``)."""
    pattern = re.compile(rf"^{_PREFIX}-(\d+)-\d+$")
    names = []
    for line in _run("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        found = pattern.match(name)
        if found and (number is None or int(found.group(1)) == number):
            names.append(name)
    return names


def _kill_namespace_processes(ns: str) -> None:
    """End, by PID, what still runs in one of our pods (only our tests start processes
    there): a namespace with a live process outlives ``ip netns del``."""
    pids = [int(pid) for pid in _run("ip", "netns", "pids", ns).stdout.split() if pid.isdigit()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _remove(number: int) -> None:
    """Everything under one network number: processes, namespaces, hosts files, bridge."""
    for ns in _our_namespaces(number):
        _kill_namespace_processes(ns)
        _run("ip", "netns", "del", ns)
    for path in _NETNS_ETC.glob(f"{_PREFIX}-{number}-*"):
        shutil.rmtree(path, ignore_errors=True)
    links = _run("ip", "-o", "link", "show").stdout
    for name in re.findall(rf"^\d+: ({_PREFIX}{number}(?:br|v\d+))[@:]", links, re.MULTILINE):
        _run("ip", "link", "del", name)


def sweep() -> list[int]:
    """Remove what crashed runs left behind: only numbers no live process holds, so a
    concurrent run keeps its own. Returns the network numbers cleaned."""
    if available() is not None:
        return []
    numbers = {int(name.split("-")[1]) for name in _our_namespaces()}
    links = _run("ip", "-o", "link", "show").stdout
    numbers |= {int(n) for n in re.findall(rf"^\d+: {_PREFIX}(\d+)br[@:]", links, re.MULTILINE)}
    cleaned = []
    for number in sorted(numbers):
        handle = _try_lock(number)
        if handle is None:
            continue  # a live network
        try:
            _remove(number)
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
            _remove(self.number)  # left by a run that crashed while it held this number
            # A fixed MAC: a bridge otherwise takes its lowest port's, which changes as pods
            # join, and a pod that already knew the gateway keeps a stale ARP entry (its
            # packets time out for about 30 s).
            _ip("link", "add", self.bridge, "address",
                f"02:00:0a:e8:{self.number:02x}:01", "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
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
        veth = f"{_PREFIX}{self.number}v{index}"
        address = f"10.232.{self.number}.{index + 2}"
        pod = Pod(self, name, ns, address)
        self.pods.append(pod)  # before creating, so close() removes a half-made pod
        etc = _NETNS_ETC / ns
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost", f"{address} {name}"]
        lines += [f"{ip} {host}" for host, ip in (hosts or {}).items()]
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        # no DNS server in a pod: an unknown name fails at once instead of timing out
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "default", "via", self.gateway)
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
        _remove(self.number)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if not self._lease.closed:
            self._lease.close()
