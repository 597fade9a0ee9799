"""Real Envoy sidecars for the lab, one process each, configured by our own bootstrap.

Explicit: on loopback, an inbound port in front of the app and an egress port the app
calls. Captured (``pod`` given): in the pod's namespace as UID 1337 (which capture leaves
alone), on the well-known capture ports, its admin on the pod's address (port 15000,
never captured) so the lab's view reads it from the host.

Each serves Prometheus stats (``stats_url``: a free port on loopback, 15090 in a pod) and
writes its JSON access log (one line per request) to its log file, beside Envoy's own."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import aiohttp
import yaml

from controlplane.bootstrap import (
    CAPTURE_STATS_PORT,
    BootstrapOptions,
    build_bootstrap,
    capture_options,
)
from controlplane.lab.envoy import envoy_command, find_envoy
from controlplane.lab.identity import SidecarIdentity
from controlplane.lab.pods import PROXY_UID, Pod
from controlplane.lab.topology import Instance, LabError, free_port


class Sidecar:
    def __init__(self, instance: Instance, workdir: Path, xds_port: int,
                 pod: Pod | None = None, xds_host: str = "127.0.0.1",
                 identity: SidecarIdentity | None = None, gateway: str | None = None,
                 listens: tuple[int, ...] = ()) -> None:
        """``identity``: xDS over TLS with its token (the lab's CA); None: plaintext.
        ``gateway``: an ingress gateway for that Gateway (on loopback, no app), whose
        listeners take ``listens``."""
        self.instance = instance
        self.listens = listens
        self.pod = pod
        self.config = workdir / f"envoy-{instance.node_id}.yaml"
        self.log_path = workdir / f"envoy-{instance.node_id}.log"
        inbound = instance.inbound_port or None
        self.identity = identity
        self.stats_port = CAPTURE_STATS_PORT if pod is not None else free_port()
        bundle = identity.bundle_pem if identity is not None else None
        token = str(identity.token_file) if identity is not None else None
        if gateway is not None:
            options = BootstrapOptions(
                node_id=instance.node_id, service=gateway, gateway=gateway,
                xds_address=f"{xds_host}:{xds_port}", admin_port=instance.admin_port,
                egress_port=instance.egress_port, inbound_address="127.0.0.1",
                stats_port=self.stats_port, xds_ca=bundle, token_file=token)
        elif pod is not None:
            options = capture_options(
                instance.node_id, instance.service, xds_address=f"{xds_host}:{xds_port}",
                admin_address=instance.address, admin_port=instance.admin_port,
                egress_port=instance.egress_port, instance_ip=instance.address,
                xds_ca=bundle, token_file=token)
        else:
            options = BootstrapOptions(
                node_id=instance.node_id, service=instance.service,
                xds_address=f"{xds_host}:{xds_port}", admin_port=instance.admin_port,
                egress_port=instance.egress_port, inbound_port=inbound,
                app_port=instance.app_port if inbound else None, inbound_address="127.0.0.1",
                stats_port=self.stats_port, xds_ca=bundle, token_file=token)
        bootstrap = build_bootstrap(options)
        # Latency quantiles per flush interval: one a second, as the lab's view refreshes.
        bootstrap["stats_flush_interval"] = "1s"
        self.config.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        self.config.chmod(0o644)  # read by Envoy as UID 1337 when captured
        self.process: asyncio.subprocess.Process | None = None

    @property
    def admin_url(self) -> str:
        return f"http://{self.instance.address}:{self.instance.admin_port}"

    @property
    def stats_url(self) -> str:
        """Where Prometheus would scrape it (labelled by source and destination service)."""
        return f"http://{self.instance.address}:{self.stats_port}/stats/prometheus"

    def command(self) -> list[str]:
        if self.pod is None:
            return envoy_command(self.config)
        # Its own network namespace: no hot restart to share, no base id to pick.
        return self.pod.argv([find_envoy(), "-c", str(self.config), "--disable-hot-restart",
                              "--concurrency", "1", "--log-level", "warning",
                              "--drain-time-s", "1"], uid=PROXY_UID)

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.command(), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.returncode is not None:
                self._check_bound()
                raise LabError(
                    f"envoy {self.instance.node_id} exited with {self.process.returncode}; "
                    f"its log says why: {self.log_path}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{self.admin_url}/ready") as response:
                    if response.status == 200:
                        self._check_bound()
                        return
            await asyncio.sleep(0.1)
        raise LabError(f"envoy {self.instance.node_id} not ready after {timeout}s; "
                       f"its log says why: {self.log_path}")

    def _check_bound(self) -> None:
        """LabError when Envoy could not bind a listener port: another process took it
        between the lab's pick and Envoy's bind."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        if self.pod is not None:
            return  # a namespace of its own: nothing else there binds ports
        for port in (self.instance.inbound_port, self.instance.egress_port,
                     self.instance.admin_port, self.stats_port, *self.listens):
            if port and (f"cannot bind '127.0.0.1:{port}'" in text
                         or f"cannot bind '0.0.0.0:{port}'" in text):
                raise LabError(f"sidecar {self.instance.node_id}: port 127.0.0.1:{port} was "
                               "taken by another process meanwhile; run the lab again")

    async def counters(self, session: aiohttp.ClientSession, pattern: str) -> dict[str, int]:
        """Envoy's own counters matching ``pattern`` (a regex), from its admin API."""
        try:
            async with session.get(f"{self.admin_url}/stats",
                                   params={"filter": pattern}) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return {}
        result: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                result[name] = int(value)
        return result

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()
