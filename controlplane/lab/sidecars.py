"""Real Envoy sidecars for the lab, one process each, configured by our own bootstrap."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import aiohttp
import yaml

from controlplane.bootstrap import BootstrapOptions, build_bootstrap
from controlplane.lab.envoy import envoy_command
from controlplane.lab.topology import Instance, LabError


class Sidecar:
    def __init__(self, instance: Instance, workdir: Path, xds_port: int) -> None:
        self.instance = instance
        self.config = workdir / f"envoy-{instance.node_id}.yaml"
        self.log_path = workdir / f"envoy-{instance.node_id}.log"
        inbound = instance.inbound_port or None
        options = BootstrapOptions(
            node_id=instance.node_id, service=instance.service,
            xds_address=f"127.0.0.1:{xds_port}", admin_port=instance.admin_port,
            egress_port=instance.egress_port, inbound_port=inbound,
            app_port=instance.app_port if inbound else None, inbound_address="127.0.0.1")
        bootstrap = build_bootstrap(options)
        # Latency quantiles per flush interval: one a second, as the lab's view refreshes.
        bootstrap["stats_flush_interval"] = "1s"
        self.config.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        self.process: asyncio.subprocess.Process | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.instance.admin_port}"

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *envoy_command(self.config), stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=log)

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
        for port in (self.instance.inbound_port, self.instance.egress_port,
                     self.instance.admin_port):
            if port and f"cannot bind '127.0.0.1:{port}'" in text:
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
