"""Real processes for end-to-end tests: the control plane, Envoy sidecars, HTTP backends.

Everything binds 127.0.0.1 on free ports, and every process started here is ended here,
by its own handle.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controlplane.lab.envoy import envoy_command


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


class Backend:
    """An HTTP app on 127.0.0.1 that answers with its own name."""

    def __init__(self, name: str, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.hits = 0
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
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

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ControlPlane:
    """``controlplane serve`` as a real process, on a mesh file or any ``--source``."""

    def __init__(self, mesh: Path | str, workdir: Path, xds_port: int | None = None,
                 extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.source = f"file:{mesh}" if isinstance(mesh, Path) else mesh
        self.workdir = workdir
        self.xds_port = xds_port or free_port()
        self.admin_port = free_port()
        self.extra = extra or []
        self.env = env or {}
        self.log_path = workdir / f"controlplane-{self.xds_port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> ControlPlane:
        self.admin_port = free_port()
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane", "serve", "--source", self.source,
             "--xds-address", f"127.0.0.1:{self.xds_port}",
             "--admin-address", f"127.0.0.1:{self.admin_port}",
             "--snapshot-dir", str(self.workdir / "snapshots"), "--log-level", "debug",
             *self.extra],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env})
        log.close()
        wait_for(lambda: self.get("/healthz")[0] == 200, what="controlplane /healthz",
                 timeout=20)
        if wait_ready:
            wait_for(lambda: self.get("/readyz")[0] == 200, what="controlplane /readyz",
                     timeout=20)
        return self

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


class Envoy:
    """A real Envoy sidecar, configured by ``controlplane bootstrap``."""

    def __init__(self, workdir: Path, node_id: str, service: str, xds_port: int,
                 delta: bool = False, extra: list[str] | None = None) -> None:
        self.node_id = node_id
        self.admin_port = free_port()
        self.egress_port = free_port()
        self.config = workdir / f"envoy-{node_id}.yaml"
        self.log_path = workdir / f"envoy-{node_id}.log"
        args = [sys.executable, "-m", "controlplane", "bootstrap", "--node-id", node_id,
                "--service", service, "--xds-address", f"127.0.0.1:{xds_port}",
                "--admin-port", str(self.admin_port), "--egress-port", str(self.egress_port),
                "-o", str(self.config), *(extra or [])]
        if delta:
            args.append("--delta")
        subprocess.run(args, check=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Envoy:
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            envoy_command(self.config),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "ENVOY_NO_COLOR": "1"})
        log.close()
        wait_for(lambda: self.admin("/ready")[0] == 200, what=f"envoy {self.node_id} ready")
        return self

    def admin(self, path: str) -> tuple[int, str, dict[str, str]]:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"envoy exited: {self.log_path.read_text()[-3000:]}")
        return http_get(f"http://127.0.0.1:{self.admin_port}{path}")

    def request(self, host: str, path: str = "/",
                headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
        return http_get(f"http://127.0.0.1:{self.egress_port}{path}", host=host,
                        headers=headers)

    def stat(self, name: str) -> int:
        _, body, _ = self.admin(f"/stats?filter=^{name}$")
        for line in body.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def stop(self) -> None:
        end(self.proc)
        self.proc = None
