"""``controlplane serve`` as a subprocess of a benchmark: free 127.0.0.1 ports, its CPU
and memory from /proc, its metrics, and an end by its own PID (also on errors)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from common import BenchError, parse_metrics


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``controlplane serve`` on free 127.0.0.1 ports, ended by its own PID."""

    def __init__(self, mesh: Path, workdir: Path, poll_interval: float | None = None,
                 env: dict[str, str] | None = None, xds_host: str = "127.0.0.1") -> None:
        self.mesh = mesh
        self.workdir = workdir
        self.poll_interval = poll_interval  # None: the server's default
        self.env = env or {}
        self.xds_host = xds_host  # e.g. a pod network's gateway, for sidecars in pods
        self.xds_port = free_port(xds_host)
        self.admin_port = free_port()
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        """Start (or start again, on the same ports: a control-plane rollout)."""
        env = {**os.environ, **self.env}
        if self.poll_interval is not None:
            env["CONTROLPLANE_POLL_INTERVAL"] = str(self.poll_interval)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "controlplane", "serve",
                 "--source", f"file:{self.mesh}",
                 "--xds-address", f"{self.xds_host}:{self.xds_port}",
                 "--admin-address", f"127.0.0.1:{self.admin_port}",
                 "--snapshot-keep", "0", "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, env=env)

    def wait_ready(self, timeout: float) -> float:
        """Block until ``GET /readyz`` is 200; the seconds it took."""
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            self.check_alive()
            with contextlib.suppress(OSError):
                if self.get("/readyz", timeout=1.0)[0] == 200:
                    return time.perf_counter() - started
            time.sleep(0.05)
        raise BenchError(f"server not ready after {timeout:.0f} s")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"server exited with {self.proc.returncode}: {self.log_tail()}")

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode(errors="replace")

    async def metrics(self) -> dict[str, float]:
        status, body = await asyncio.to_thread(self.get, "/metrics")
        if status != 200:
            raise BenchError(f"GET /metrics answered {status}")
        return parse_metrics(body)

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all threads), from /proc/PID/stat."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # fields from #3 (state) on
        ticks = int(fields[11]) + int(fields[12])  # #14 utime, #15 stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def thread_cpu_seconds(self) -> dict[str, float]:
        """utime + stime per thread, keyed ``main`` (the event loop: streams,
        publishing) or the thread's name and id (Python's workers are all ``python``;
        gRPC names its own)."""
        found: dict[str, float] = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue  # the thread ended
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            key = "main" if task.name == str(self.pid) else f"{name}/{task.name}"
            found[key] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return found

    async def idle(self, timeout: float, window: float = 0.25, busy: float = 0.1) -> None:
        """Wait until the server uses less than ``busy`` of a CPU over ``window`` seconds:
        it may still be reading ACKs after the last stream got its push."""
        limit = time.perf_counter() + timeout
        while True:
            used = self.cpu_seconds()
            await asyncio.sleep(window)
            if self.cpu_seconds() - used < busy * window:
                return
            if time.perf_counter() > limit:
                raise BenchError(f"the server stayed busy for {timeout:.0f} s")

    def memory_mib(self, key: str) -> float:
        """A Vm* line of /proc/PID/status (VmHWM = peak RSS, VmRSS = now), in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise BenchError(f"{key} not in /proc/{self.pid}/status")

    def stop(self) -> None:
        """SIGTERM our server by its PID; SIGKILL it if it does not exit within 5 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_problems(self) -> list[str]:
        """Lines of the server log (run at level warning): every one is worth a look."""
        if not self.log_path.exists():
            return []
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if line.strip()]

    def log_sample(self, count: int = 3) -> list[str]:
        """The first few problems, each as its event and the last line of its exception
        (the line that says what went wrong), for the results."""
        sample = []
        for line in self.log_problems()[:count]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                sample.append(line[:300])
                continue
            error = str(entry.get("exception", "")).strip().splitlines()[-1:]
            sample.append(" ".join([str(entry.get("event", "")), *error])[:300])
        return sample

    def log_tail(self, chars: int = 2000) -> str:
        return "\n".join(self.log_problems())[-chars:]
