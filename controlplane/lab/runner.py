"""``controlplane lab``: the whole mesh on loopback, in one command, no Docker needed.

Starts the control plane on the lab's mesh file, the demo apps, one real Envoy sidecar
per app, and a traffic generator; prints once a second what the sidecars see. Ctrl-C or
SIGTERM stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import TextIO

import aiohttp
import structlog

from controlplane.app import Running, start
from controlplane.lab.apps import start_app
from controlplane.lab.sidecars import Sidecar
from controlplane.lab.topology import Plan, plan
from controlplane.lab.traffic import Traffic
from controlplane.settings import ServeSettings

log = structlog.get_logger("controlplane.lab")
_INBOUND = r"^http\.inbound\.downstream_rq_(completed|2xx)$"


async def _view(plan_: Plan, sidecars: list[Sidecar], traffic: Traffic,
                session: aiohttp.ClientSession, out: TextIO) -> None:
    """One line a second: per service rate and success from each sidecar's inbound stats,
    latency and the reviews version mix as the traffic generator saw them."""
    before: dict[str, dict[str, int]] = {}
    started = time.monotonic()
    while True:
        await asyncio.sleep(1.0)
        per_service: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for sidecar in sidecars:
            if not sidecar.instance.inbound_port:
                continue
            now = await sidecar.counters(session, _INBOUND)
            old = before.get(sidecar.instance.node_id, now)
            before[sidecar.instance.node_id] = now
            totals = per_service[sidecar.instance.service]
            for index, key in enumerate(("completed", "2xx")):
                name = f"http.inbound.downstream_rq_{key}"
                totals[index] += now.get(name, 0) - old.get(name, 0)
        latencies, statuses, versions = traffic.take()
        parts = [f"[{time.monotonic() - started:5.0f}s]"]
        for service in dict.fromkeys(i.service for i in plan_.instances):
            done, ok = per_service[service]
            rate = f"{100 * ok / done:5.1f}%" if done else "   - "
            parts.append(f"{service} {done:3d} rps {rate} ok")
        if latencies:
            ordered = sorted(latencies)
            p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            parts.append(f"p50 {1000 * statistics.median(ordered):.1f}ms p99 {1000 * p99:.1f}ms")
        total = sum(versions.values())
        if total:
            mix = " ".join(f"{v} {100 * n / total:.0f}%" for v, n in sorted(versions.items()))
            parts.append(f"reviews: {mix}")
        failed = sum(n for code, n in statuses.items() if code != 200)
        if failed:
            parts.append(f"errors {failed} {dict(sorted(statuses.items()))}")
        print(parts[0], " | ".join(parts[1:]), file=out, flush=True)


async def _lab(duration: float, mesh_template: str | None, rate: float, out: TextIO) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="controlplane-lab-"))
    layout = plan(workdir, mesh_template)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    running: Running | None = None
    sidecars: list[Sidecar] = []
    runners = []
    tasks: list[asyncio.Task[None]] = []
    session = aiohttp.ClientSession()
    try:
        print(f"controlplane lab: starting in {workdir}", file=out, flush=True)
        running = await start(ServeSettings(
            source=f"file:{layout.mesh_path}", xds_address=f"127.0.0.1:{layout.xds_port}",
            admin_address=f"127.0.0.1:{layout.admin_port}",
            snapshot_dir=workdir / "snapshots", poll_interval=0.1))
        for instance in layout.instances:
            runners.append(await start_app(instance, session))
        sidecars = [Sidecar(i, workdir, layout.xds_port)
                    for i in (*layout.instances, layout.loadgen)]
        for sidecar in sidecars:
            await sidecar.start()
        await asyncio.gather(*(s.wait_ready(session) for s in sidecars))
        print(f"  mesh file (edit it live): {layout.mesh_path}", file=out)
        print(f"  control plane admin:      http://127.0.0.1:{layout.admin_port}/  "
              f"(xDS on 127.0.0.1:{layout.xds_port})", file=out)
        for sidecar in sidecars:
            i = sidecar.instance
            where = f"inbound 127.0.0.1:{i.inbound_port}, " if i.inbound_port else ""
            print(f"  sidecar {i.node_id:14s} {where}egress 127.0.0.1:{i.egress_port}, "
                  f"admin {sidecar.admin_url}/", file=out)
        print(f"  try: curl -H 'Host: frontend' http://127.0.0.1:{layout.loadgen.egress_port}/",
              file=out)
        print("  Ctrl-C stops everything.", file=out, flush=True)

        traffic = Traffic(session, layout.loadgen.egress_port, rate)
        tasks = [asyncio.create_task(traffic.run()),
                 asyncio.create_task(_view(layout, sidecars, traffic, session, out))]
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter], timeout=duration or None)
        waiter.cancel()
        return 0
    finally:
        print("controlplane lab: stopping", file=out, flush=True)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await asyncio.gather(*(s.stop() for s in sidecars), return_exceptions=True)
        for runner in runners:
            await runner.cleanup()
        await session.close()
        if running is not None:
            await running.stop(grace=0.5)
        print("controlplane lab: stopped", file=out, flush=True)


def run_lab(duration: float = 0.0, mesh_path: str | None = None, rate: float = 20.0) -> int:
    template = Path(mesh_path).read_text(encoding="utf-8") if mesh_path else None
    return asyncio.run(_lab(duration, template, rate, sys.stdout))
