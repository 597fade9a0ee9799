"""What the chaos tests and bench/chaos.py share: a real server, real sidecars, real
backends, a bounded traffic loop that counts every failed request, and mesh files.

Each scenario function returns its figures (a dict) and raises AssertionError when the
server broke its promise, so the tests assert on them and the benchmark prints them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.files import write_atomic
from tests.support.procs import Backend, ControlPlane, Envoy, http_get, wait_for


def mesh_text(services: dict[str, list[Backend]], policy: dict[str, Any] | None = None) -> str:
    """A mesh file: each service on port 9080 with its backends as endpoints."""
    mesh = {"services": [
        {"name": name, "port": 9080,
         "endpoints": [{"address": "127.0.0.1", "port": b.port} for b in backends],
         **({"policy": policy} if policy else {})}
        for name, backends in services.items()]}
    return yaml.safe_dump(mesh, sort_keys=False)


def big_mesh_text(backend: Backend, count: int) -> str:
    """``count`` services (svc-0 ... svc-N), each with one endpoint on ``backend``."""
    return yaml.safe_dump({"services": [
        {"name": f"svc-{i}", "port": 9080,
         "endpoints": [{"address": "127.0.0.1", "port": backend.port}]}
        for i in range(count)]})


@dataclass
class Traffic:
    """Requests through a sidecar at a steady rate on a thread, every outcome counted.
    Bounded in count and time: it stops by itself after ``max_seconds``."""

    envoy: Envoy
    host: str
    rps: float = 20.0
    max_seconds: float = 120.0
    ok: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)
    bodies: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, daemon=True, name="traffic")
        self._thread.start()
        return self

    def _run(self) -> None:
        started = time.monotonic()
        interval = 1.0 / self.rps
        while not self._stop.is_set() and time.monotonic() - started < self.max_seconds:
            sent = time.monotonic()
            try:
                status, body, _ = http_get(f"http://127.0.0.1:{self.envoy.egress_port}/",
                                           host=self.host, timeout=5)
            except OSError as exc:
                self.failures.append((sent - started, f"{type(exc).__name__}: {exc}"))
            else:
                if status == 200:
                    self.ok += 1
                    self.bodies[body] += 1
                else:
                    self.failures.append((sent - started, f"HTTP {status}: {body[:120]}"))
            self._stop.wait(max(0.0, interval - (time.monotonic() - sent)))

    def stop(self) -> Traffic:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        return self

    @property
    def failed(self) -> int:
        return len(self.failures)

    def summary(self) -> dict[str, Any]:
        return {"requests": self.ok + self.failed, "failed": self.failed,
                "first_failures": [f"{t:.2f}s {what}" for t, what in self.failures[:5]]}


def answered_by(envoy: Envoy, host: str, name: str) -> bool:
    status, body, _ = envoy.request(host)
    return status == 200 and body == name


class Stack:
    """Backends, control plane replicas and sidecars started by one test; all ended by
    ``close`` (each by its own handle)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.mesh = workdir / "mesh.yaml"
        self.backends: list[Backend] = []
        self.servers: list[ControlPlane] = []
        self.envoys: list[Envoy] = []
        self.traffic: list[Traffic] = []

    def backend(self, name: str) -> Backend:
        backend = Backend(name)
        self.backends.append(backend)
        return backend

    def server(self, extra: list[str] | None = None, env: dict[str, str] | None = None,
               wait_ready: bool = True) -> ControlPlane:
        server = ControlPlane(self.mesh, self.workdir, extra=extra, env=env)
        self.servers.append(server)
        return server.start(wait_ready=wait_ready)

    def envoy(self, node_id: str, xds_port: int, delta: bool = False,
              cls: type[Envoy] = Envoy) -> Envoy:
        envoy = cls(self.workdir, node_id, "frontend", xds_port, delta)
        self.envoys.append(envoy)
        return envoy.start()

    def run_traffic(self, envoy: Envoy, host: str, rps: float = 20.0,
                    max_seconds: float = 120.0) -> Traffic:
        traffic = Traffic(envoy, host, rps, max_seconds)
        self.traffic.append(traffic)
        return traffic.start()

    def close(self) -> None:
        for traffic in self.traffic:
            traffic.stop()
        for envoy in self.envoys:
            envoy.stop()
        for server in self.servers:
            server.stop()
        for backend in self.backends:
            backend.stop()


def rss_mb(pid: int) -> float:
    """Resident memory of a process we started, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def connected(envoy: Envoy) -> bool:
    return envoy.stat("control_plane.connected_state") == 1


def server_sees(server: ControlPlane, node_id: str) -> bool:
    return any(p["node_id"] == node_id and p["types"].get("cds", {}).get("acked_version")
               for p in server.json("/debug/proxies"))


def healthz(server: ControlPlane) -> int:
    return http_get(f"http://127.0.0.1:{server.admin_port}/healthz", timeout=5)[0]


def alive(server: ControlPlane) -> bool:
    return server.proc is not None and server.proc.poll() is None


def wait_reconnected(envoy: Envoy, server: ControlPlane, timeout: float = 30.0) -> float:
    """Seconds until the sidecar is connected and the server has its ACK."""
    started = time.monotonic()
    wait_for(lambda: connected(envoy) and server_sees(server, envoy.node_id),
             timeout=timeout, interval=0.05, what=f"{envoy.node_id} reconnected")
    return time.monotonic() - started


def pid_of(server: ControlPlane) -> int:
    assert server.proc is not None
    return server.proc.pid


def errors_after(server: ControlPlane, offset: int) -> list[str]:
    """Error lines (and tracebacks) the server logged after byte ``offset`` of its log."""
    with open(server.log_path, "rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    return [line for line in text.splitlines()
            if '"level": "error"' in line or '"level": "critical"' in line
            or line.startswith("Traceback")]


def push_seconds(stack: Stack, envoy: Envoy, backends: dict[str, Any], service: str,
                  timeout: float) -> float:
    """Move ``service`` to the 'moved' backend; seconds until the sidecar answers from it."""
    mesh = yaml.safe_load(stack.mesh.read_text())
    for entry in mesh["services"]:
        if entry["name"] == service:
            entry["endpoints"] = [{"address": "127.0.0.1", "port": backends["moved"].port}]
    changed = time.monotonic()
    write_atomic(stack.mesh, yaml.safe_dump(mesh))
    wait_for(lambda: answered_by(envoy, service, "moved"), timeout=timeout, interval=0.02,
             what=f"the change of {service} reaching the sidecar")
    return time.monotonic() - changed


def services_mesh(backend_ports: list[int], services: int) -> str:
    """``services`` services svc-0 ..., each with an endpoint per port."""
    return yaml.safe_dump({"services": [
        {"name": f"svc-{i}", "port": 9080,
         "endpoints": [{"address": "127.0.0.1", "port": port} for port in backend_ports]}
        for i in range(services)]})
