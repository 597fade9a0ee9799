"""The event loop under load: how long a mesh change or a crowd of invented proxies holds
up xDS, and what memory does when a big mesh goes away.

Runs the server in this process (``controlplane.app.start`` with an in-memory source) so
a ticker task on the same event loop can see every stall. Three parts:

1. ``change``: a mesh of M services (default 1000) and 20 groups in 5 namespaces; an
   endpoint change and a policy change (every route table rebuilt), each applied the old
   way (``Pipeline.set_mesh`` on the loop) and the new way (``Pipeline.apply``: built on a
   worker thread, published on the loop). Figures: seconds, longest loop stall (ms).
2. ``invented``: N raw ADS streams (default 500) with made-up services and namespaces;
   seconds until all are answered, longest stall, RSS; then a mesh change with their
   groups kept, and again once they are gone and the group TTL (2 s) has passed.
3. ``memory``: RSS with 2 services, with B (default 5000), and back with 2.

    .venv/bin/python bench/pipeline_load.py [--services 1000] [--invented 500] [--big 5000]

Writes JSON (``--out``, default bench/results/runs/pipeline_load-<UTC time>.json) and
prints it. Everything is bounded by ``--deadline`` (default 300 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import BenchError, Deadline, LoopStalls, add_output_flags, results_path
from controlplane import app, resource
from controlplane.cache import SnapshotCache
from controlplane.mesh import Mesh, load_mesh_text
from controlplane.pipeline import Pipeline
from controlplane.proxy import ProxyIdentity
from controlplane.settings import ServeSettings
from tests.support.xds_client import AdsClient, node


def mesh(services: int, port: int, timeout: str = "") -> Mesh:
    policy = f"policy: {{timeout: {timeout}}}, " if timeout else ""
    lines = ["services:"]
    for i in range(services):
        first = port if i == 0 else 20000 + i % 1000
        lines.append(f"  - {{name: svc-{i:04d}, port: 9080, {policy if i == 0 else ''}"
                     f"endpoints: [{{address: 127.0.0.1, port: {first}}}, "
                     f"{{address: 127.0.0.2, port: {first}}}]}}")
    return load_mesh_text("\n".join(lines) + "\n")


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class QueueSource:
    name = "bench"

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Mesh] = asyncio.Queue()

    async def updates(self) -> AsyncIterator[Mesh]:
        while True:
            yield await self.queue.get()


async def change(deadline: Deadline, running: app.Running, source: QueueSource,
                 new: Mesh) -> float:
    generation = running.pipeline.generation
    started = time.perf_counter()
    await source.queue.put(new)

    async def applied() -> None:
        while running.pipeline.generation == generation:
            await asyncio.sleep(0.005)

    await deadline.wait("a mesh change to be applied", applied())
    return round(time.perf_counter() - started, 3)


async def part_change(services: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for mode in ("set_mesh", "apply"):
        cache = SnapshotCache()
        pipeline = Pipeline(cache)
        pipeline.set_mesh(mesh(services, 9001))
        for g in range(20):
            cache.connect(ProxyIdentity(node_id=f"n{g}", service=f"svc-{g:04d}",
                                        namespace=f"ns{g % 5}"))
        await asyncio.sleep(0.5)  # the new groups' first builds
        while pipeline._tasks:
            await asyncio.sleep(0.05)
        for label, new in (("endpoint_change", mesh(services, 9002)),
                           ("policy_change", mesh(services, 9002, "2s"))):
            async with LoopStalls() as stalls:
                started = time.perf_counter()
                if mode == "set_mesh":
                    pipeline.set_mesh(new)
                else:
                    await pipeline.apply(new)
                seconds = round(time.perf_counter() - started, 3)
            figures[f"{mode}_{label}"] = {"seconds": seconds, "longest_stall_ms": stalls.ms}
        pipeline.close()
    return figures


async def part_invented(deadline: Deadline, services: int, count: int) -> dict[str, Any]:
    source = QueueSource()
    running = await app.start(ServeSettings(
        xds_address="127.0.0.1:0", admin_address="127.0.0.1:0", snapshot_keep=0,
        group_ttl=2.0), source)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.xds_port}", options=[
        ("grpc.max_receive_message_length", 1 << 28)])
    figures: dict[str, Any] = {"streams": count, "services": services}
    try:
        await change(deadline, running, source, mesh(services, 9001))
        clients = [AdsClient(channel) for _ in range(count)]
        async with LoopStalls() as stalls:
            started = time.perf_counter()
            for i, client in enumerate(clients):
                await client.send(node=node(f"x{i}", f"made-up-{i}", namespace=f"ns-{i}"),
                                  type_url=resource.CLUSTER)
            answered: list[Awaitable[Any]] = [c.recv(deadline.left()) for c in clients]
            await asyncio.gather(*answered)
            figures["all_answered_seconds"] = round(time.perf_counter() - started, 2)
        figures["longest_stall_ms"] = stalls.ms
        figures["rss_mib_connected"] = rss_mib()
        figures["groups_connected"] = len(running.cache)
        figures["change_seconds_connected"] = await change(
            deadline, running, source, mesh(services, 9002))
        for client in clients:
            await client.close()
        figures["change_seconds_within_ttl"] = await change(
            deadline, running, source, mesh(services, 9003))
        await asyncio.sleep(3.0)
        figures["groups_after_ttl"] = len(running.cache)
        figures["change_seconds_after_ttl"] = await change(
            deadline, running, source, mesh(services, 9004))
        figures["rss_mib_after_ttl"] = rss_mib()
    finally:
        await channel.close()
        await running.stop(0)
    return figures


async def part_memory(deadline: Deadline, big: int) -> dict[str, Any]:
    source = QueueSource()
    running = await app.start(ServeSettings(
        xds_address="127.0.0.1:0", admin_address="127.0.0.1:0", snapshot_keep=0), source)
    try:
        await change(deadline, running, source, mesh(2, 9001))
        running.cache.connect(ProxyIdentity(node_id="a", service="svc-0000"))
        await asyncio.sleep(0.2)
        figures = {"rss_mib_2_services": rss_mib()}
        await change(deadline, running, source, mesh(big, 9001))
        figures[f"rss_mib_{big}_services"] = rss_mib()
        await change(deadline, running, source, mesh(2, 9003))
        await asyncio.sleep(0.5)
        figures["rss_mib_back_to_2"] = rss_mib()
    finally:
        await running.stop(0)
    return figures


async def run(args: argparse.Namespace) -> dict[str, Any]:
    deadline = Deadline(args.deadline)
    return {
        "memory": await part_memory(deadline, args.big),
    } if args.only_memory else {
        "memory": await part_memory(deadline, args.big),
        "change": await part_change(args.services),
        "invented": await part_invented(deadline, args.services, args.invented),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--invented", type=int, default=500)
    parser.add_argument("--big", type=int, default=5000)
    parser.add_argument("--only-memory", action="store_true")
    parser.add_argument("--deadline", type=float, default=300.0)
    add_output_flags(parser, "pipeline_load.json")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        figures = asyncio.run(run(args))
    except BenchError as exc:
        figures = {"error": str(exc)}
    path = results_path("pipeline_load.json", args.out, args.update_baseline)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"written to {path}", file=sys.stderr)
    return 1 if "error" in figures else 0


if __name__ == "__main__":
    sys.exit(main())
