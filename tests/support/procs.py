"""Real processes for end-to-end tests: the control plane, Envoy sidecars, HTTP backends.

Everything binds 127.0.0.1, and every process started here is ended here, by its own
handle. Ports are taken without races, so tests run in parallel (pytest-xdist): what our
own code binds (backends, the control plane's xDS and admin, Envoy's admin) binds port 0
and reads the port back; what Envoy must bind on a port named up front (its egress and
inbound listeners, which the bootstrap carries) is picked free and, when another process
took it in between, the whole sidecar start is retried on new ports.
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from controlplane.lab.envoy import envoy_command
from controlplane.lab.topology import free_port as lab_free_port
from tests.support.threaded import QuietHttpServer, Served

_serial = itertools.count(1)
_START_ATTEMPTS = 5


def _worker_shard() -> tuple[int, int]:
    """(this worker's index, how many slices): gw0..gw7 get one of 8 slices each."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit():
        return int(worker[2:]) % 8, 8
    return 0, 1


_WORKER_SHARD = _worker_shard()


def free_port() -> int:
    """A port free right now, below the ephemeral range so that no port-0 bind can take
    it before it is used (see controlplane.lab.topology.free_port). Still only for ports
    a process must be told up front; prefer binding port 0. Each pytest-xdist worker
    picks from its own slice of the range, so two workers never pick the same port."""
    return lab_free_port(shard=_WORKER_SHARD)


def wait_for(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.1,
             what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; the last error is in the message."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
            last = result
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def http_get(
    url: str, host: str | None = None, timeout: float = 3.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, headers={**({"Host": host} if host else {}),
                                                   **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace"), dict(exc.headers)


def end(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a process this test started: SIGTERM, then SIGKILL after 10 s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Backend(Served):
    """An HTTP app on ``host`` (127.0.0.1 unless given) that answers with its own name."""

    def __init__(self, name: str, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.name = name
        self.hits = 0
        lock = threading.Lock()  # handlers run on threads: count every hit
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                with lock:
                    backend.hits += 1
                body = backend.name.encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("x-backend", backend.name)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(QuietHttpServer((host, port or 0), Handler))


class ControlPlane:
    """``controlplane serve`` as a real process, on a mesh file or any ``--source``.

    Its admin port is always the server's own pick (port 0, read back from its
    ``serve.started`` log line); so is its xDS port, unless given or already used by a
    previous start (a restart keeps the port its sidecars dial)."""

    def __init__(self, mesh: Path | str, workdir: Path, xds_port: int | None = None,
                 extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.source = f"file:{mesh}" if isinstance(mesh, Path) else mesh
        self.workdir = workdir
        self._xds_port = xds_port
        self.admin_port = 0
        self.extra = extra or []
        self.env = env or {}
        self.log_path = workdir / f"controlplane-{os.getpid()}-{next(_serial)}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def xds_port(self) -> int:
        """Asked before the first start (a sidecar started ahead of its server), a free
        port is picked now and the server told to use it."""
        if self._xds_port is None:
            self._xds_port = free_port()
        return self._xds_port

    def start(self, wait_ready: bool = True) -> ControlPlane:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane", "serve", "--source", self.source,
             "--xds-address", f"127.0.0.1:{self._xds_port or 0}",
             "--admin-address", "127.0.0.1:0",
             "--snapshot-dir", str(self.workdir / "snapshots"), "--log-level", "debug",
             *self.extra],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env})
        log.close()
        try:
            self._xds_port, self.admin_port = wait_for(
                lambda: self._bound_ports(offset), what="controlplane serve.started",
                timeout=30)
            wait_for(lambda: self.get("/healthz")[0] == 200, what="controlplane /healthz",
                     timeout=20)
            if wait_ready:
                wait_for(lambda: self.get("/readyz")[0] == 200, what="controlplane /readyz",
                         timeout=20)
        except BaseException as exc:  # not up: end it here, the caller never got a handle
            self.stop()
            if not isinstance(exc, Exception):
                raise  # a timeout or Ctrl-C stays what it is
            raise AssertionError(f"{exc}; its log: {self._tail(offset)}") from exc
        return self

    def _tail(self, offset: int, size: int = 3000) -> str:
        with open(self.log_path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")[-size:]

    def _bound_ports(self, offset: int) -> tuple[int, int] | None:
        """The xDS and admin ports from this start's ``serve.started`` line, if logged."""
        with open(self.log_path, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
        for line in text.splitlines():
            if "serve.started" not in line:
                continue
            xds = re.search(r'xds(?:": "|=)[^\s",]*:(\d+)', line)
            admin = re.search(r'admin(?:": "|=)http://[^\s",]*:(\d+)/', line)
            if xds and admin:
                return int(xds.group(1)), int(admin.group(1))
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"controlplane exited with {self.proc.returncode}: "
                               f"{text[-2000:]}")
        return None

    def get(self, path: str) -> tuple[int, str, dict[str, str]]:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"controlplane exited: {self.log_path.read_text()[-2000:]}")
        return http_get(f"http://127.0.0.1:{self.admin_port}{path}")

    def json(self, path: str) -> Any:
        status, body, _ = self.get(path)
        assert status == 200, body
        return json.loads(body)

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                lines.append(json.loads(line))
        return lines

    def stop(self) -> None:
        end(self.proc)
        self.proc = None


def listening_sockets(port: int) -> int:
    """How many sockets listen on ``port`` here (/proc/net/tcp). Envoy's listeners set
    SO_REUSEPORT, so a second Envoy given a port another already listens on binds it too,
    and the two split its connections, silently: more than one means a shared port."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


class PortTaken(Exception):
    """Envoy could not bind a port picked for it: another process took it first."""


class Envoy:
    """A real Envoy sidecar, configured by ``controlplane bootstrap``.

    Envoy's admin binds port 0 (its address is read from ``--admin-address-path``). The
    egress port, and the inbound port when ``app_port`` is given, are picked free; when
    Envoy then cannot bind one (another process was quicker), the sidecar is started
    again on new ports, up to five times. Ports passed in ``extra`` are the test's own
    and never retried (a test may mean Envoy to fail on them)."""

    def __init__(self, workdir: Path, node_id: str, service: str, xds_port: int,
                 delta: bool = False, extra: list[str] | None = None,
                 app_port: int | None = None, ready_timeout: float = 30.0) -> None:
        self.node_id = node_id
        # Generous for a loaded machine; a test that means Envoy never to get config
        # waits less than Envoy's own 15 s initial fetch timeout, after which Envoy
        # says it is ready without any.
        self.ready_timeout = ready_timeout
        self.service = service
        self.xds_port = xds_port
        self.delta = delta
        self.extra = extra or []
        self.app_port = app_port
        self.admin_port = 0
        self.egress_port = 0
        self.inbound_port: int | None = None
        self.config = workdir / f"envoy-{node_id}.yaml"
        self.log_path = workdir / f"envoy-{node_id}.log"
        self.admin_path = workdir / f"envoy-{node_id}.admin"
        self.proc: subprocess.Popen[bytes] | None = None
        self._bootstrap()

    def _bootstrap(self) -> None:
        self.egress_port = free_port()
        args = [sys.executable, "-m", "controlplane", "bootstrap", "--node-id", self.node_id,
                "--service", self.service, "--xds-address", f"127.0.0.1:{self.xds_port}",
                "--admin-port", "0", "--egress-port", str(self.egress_port),
                "-o", str(self.config), *self.extra]
        if self.app_port is not None:
            self.inbound_port = free_port()
            args += ["--inbound-port", str(self.inbound_port), "--app-port",
                     str(self.app_port), "--inbound-address", "127.0.0.1"]
        if self.delta:
            args.append("--delta")
        subprocess.run(args, check=True, timeout=60)

    def start(self) -> Envoy:
        for attempt in range(_START_ATTEMPTS):
            if attempt:
                self._bootstrap()
            try:
                return self._start_once()
            except PortTaken:
                self.stop()
        raise AssertionError(f"envoy {self.node_id}: its ports were taken "
                             f"{_START_ATTEMPTS} times; see {self.log_path}")

    def _start_once(self) -> Envoy:
        self.admin_path.unlink(missing_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            envoy_command(self.config, admin_address_path=self.admin_path),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "ENVOY_NO_COLOR": "1"})
        log.close()
        try:
            self.admin_port = wait_for(self._admin_port, what=f"envoy {self.node_id} admin")
            wait_for(lambda: self.admin("/ready")[0] == 200, timeout=self.ready_timeout,
                     what=f"envoy {self.node_id} ready")
            self._check_ports(offset)
        except BaseException:  # not up (or on a taken port): end it here
            self.stop()
            raise
        return self

    def _admin_port(self) -> int | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"envoy exited: {self.log_path.read_text()[-3000:]}")
        text = self.admin_path.read_text() if self.admin_path.exists() else ""
        _, _, port = text.strip().rpartition(":")
        return int(port) if port.isdigit() else None

    def _check_ports(self, offset: int) -> None:
        """PortTaken when Envoy logged that it cannot bind a port picked here."""
        with open(self.log_path, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
        for port in (self.egress_port, self.inbound_port):
            if port is not None and f"cannot bind '127.0.0.1:{port}'" in text:
                raise PortTaken(port)
            if port is not None and listening_sockets(port) > 1:
                raise PortTaken(port)  # another Envoy on it too: SO_REUSEPORT shares it

    def admin(self, path: str) -> tuple[int, str, dict[str, str]]:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"envoy exited: {self.log_path.read_text()[-3000:]}")
        return http_get(f"http://127.0.0.1:{self.admin_port}{path}")

    def request(self, host: str, path: str = "/",
                headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
        return http_get(f"http://127.0.0.1:{self.egress_port}{path}", host=host,
                        headers=headers)

    def stat(self, name: str) -> int:
        return admin_stat(self.admin, name)

    def stop(self) -> None:
        end(self.proc)
        self.proc = None


def admin_stat(admin: Callable[[str], tuple[int, str, dict[str, str]]], name: str) -> int:
    """One Envoy stat by its exact name (cluster names hold regex characters), read
    through ``admin`` (a GET of an admin path); 0 when Envoy has no such stat yet."""
    query = urllib.parse.urlencode({"filter": "^" + re.escape(name) + "$"})
    _, body, _ = admin(f"/stats?{query}")
    for line in body.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


class Stoppable(Protocol):
    def stop(self) -> None: ...


def stop_all(envoys: Iterable[Stoppable], server: Stoppable | None,
             apps: Iterable[Stoppable] = ()) -> None:
    """A rig's teardown, in order: its sidecars (they hold streams to the server), the
    control plane, then the apps and doubles they called. Each is stopped even when one
    before it failed to stop, so no process outlives the test; the first failure is
    raised at the end."""
    failed: list[BaseException] = []
    for thing in [*envoys, *([server] if server is not None else []), *apps]:
        try:
            thing.stop()
        except Exception as exc:
            failed.append(exc)
    if failed:
        raise failed[0]
