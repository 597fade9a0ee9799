"""The captured lab: each demo app in a pod of its own, its traffic caught by iptables.

Per pod (controlplane/lab/pods.py): ``controlplane capture`` as root (the init step of an
injected pod), the demo app as root (never UID 1337, whose traffic capture leaves alone)
calling ``http://<next service>:<port>/`` by name, and an Envoy as UID 1337 with a
captured bootstrap. The traffic generator runs in a pod of its own too and reports to
the lab once a second on its stdout (``traffic.py --json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from controlplane.lab.apps import ready_line
from controlplane.lab.identity import SidecarIdentity
from controlplane.lab.pods import Network, Pod
from controlplane.lab.sidecars import Sidecar
from controlplane.lab.topology import CALLS, Instance, LabError, Plan, plan_captured


class RemoteTraffic:
    """The traffic generator in the loadgen pod, seen as ``traffic.Traffic`` is: ``rate``
    (settable), ``take()`` (what came since the last take) and ``run()``."""

    def __init__(self, process: asyncio.subprocess.Process, rate: float) -> None:
        self.process = process
        self._rate = rate
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[str] = Counter()
        self.callers: dict[str, str] = {}

    @property
    def rate(self) -> float:
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        self._rate = value
        if self.process.stdin is not None and self.process.returncode is None:
            self.process.stdin.write(f"rate {value}\n".encode())

    async def run(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            try:
                report = json.loads(raw)
            except ValueError:
                continue
            self.latencies += [float(x) for x in report.get("latencies", [])]
            self.statuses.update({int(k): int(v) for k, v in report.get("statuses", {}).items()})
            self.versions.update({str(k): int(v) for k, v in report.get("versions", {}).items()})
            self.callers.update({str(k): str(v) for k, v in report.get("callers", {}).items()})

    def take(self) -> tuple[list[float], Counter[int], Counter[str]]:
        taken = self.latencies, self.statuses, self.versions
        self.latencies, self.statuses, self.versions = [], Counter(), Counter()
        return taken


class CapturedLab:
    """The lab's network, pods and the processes in them; ``close()`` ends them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.network = Network()
        self.pods: dict[str, Pod] = {}
        self.processes: list[asyncio.subprocess.Process] = []

    def open(self, template: str | None, prefer: bool) -> tuple[Plan, list[int]]:
        """The bridge, and the plan on it; also the crashed labs' networks it removed."""
        swept = self.network.open()
        self.workdir.chmod(0o755)  # Envoy runs as UID 1337 and reads its bootstrap here
        number = self.network.number
        layout = plan_captured(self.workdir, lambda i: f"10.240.{number}.{i + 2}", template,
                               prefer)
        return layout, swept

    async def start(self, layout: Plan, xds_port: int,
                    identify: Callable[[Instance], SidecarIdentity | None] = lambda _: None,
                    ) -> list[Sidecar]:
        """Pods with capture and apps; their sidecars, made but not started (each with
        the identity ``identify`` gives it)."""
        hosts = dict(layout.virtual_ips)
        sidecars = []
        for instance in (*layout.instances, layout.loadgen):
            pod = self.network.pod(instance.node_id, hosts)
            if pod.address != instance.address:
                raise LabError(f"pod {pod.name} got {pod.address}, planned {instance.address}")
            self.pods[instance.node_id] = pod
            await self._capture(pod)
            if instance.app_port:
                await self._app(pod, instance, _call_url(instance, layout))
            sidecars.append(Sidecar(instance, self.workdir, xds_port, pod=pod,
                                    xds_host=self.network.gateway,
                                    identity=identify(instance)))
        return sidecars

    async def traffic(self, layout: Plan, rate: float) -> RemoteTraffic:
        pod = self.pods[layout.loadgen.node_id]
        url = f"http://frontend:{layout.service_ports.get('frontend', 80)}/"
        with (self.workdir / "loadgen.log").open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *pod.argv([sys.executable, "-m", "controlplane.lab.traffic", "--url", url,
                           "--rate", str(rate), "--json"]),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log)
        self.processes.append(process)
        return RemoteTraffic(process, rate)

    async def _capture(self, pod: Pod) -> None:
        process = await asyncio.create_subprocess_exec(
            *pod.argv([sys.executable, "-m", "controlplane", "capture", "--log-level",
                       "warning"]),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        output, _ = await process.communicate()
        if process.returncode != 0:
            raise LabError(f"controlplane capture in pod {pod.name} exited "
                           f"{process.returncode}: {output.decode(errors='replace').strip()}; "
                           "run `controlplane lab --explicit` to run without capture")

    async def _app(self, pod: Pod, instance: Instance, call: str | None) -> None:
        """The demo app in its pod, on the endpoint's port; back once it listens."""
        log_path = self.workdir / f"app-{instance.node_id}.log"
        argv = [sys.executable, "-m", "controlplane.lab.apps", "--service", instance.service,
                "--version", instance.version, "--port", str(instance.app_port),
                "--host", "0.0.0.0"]
        if call is not None:
            argv += ["--call", call]
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *pod.argv(argv), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        self.processes.append(process)
        ready = ready_line(instance, "0.0.0.0", call)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if ready in log_path.read_text(encoding="utf-8", errors="replace"):
                return
            if process.returncode is not None:
                break
            await asyncio.sleep(0.1)
        raise LabError(f"the {instance.node_id} app in pod {pod.name} did not start; its "
                       f"log says why: {log_path}")

    async def close(self) -> None:
        """End what the lab started in its pods (by PID), then remove the network."""
        for process in self.processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        self.processes.clear()
        await asyncio.to_thread(self.network.close)


def _call_url(instance: Instance, layout: Plan) -> str | None:
    """The plain URL the app calls: its downstream by name on the service's port."""
    downstream = CALLS.get(instance.service)
    if downstream is None:
        return None
    return f"http://{downstream}:{layout.service_ports.get(downstream, 80)}/"
