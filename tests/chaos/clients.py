"""What clients control, against a real server: invented identities, oversized and
unknown requests, clients that stop reading and vanish. Each scenario returns its figures
and raises AssertionError when a promise is broken."""

from __future__ import annotations

import asyncio
import contextlib
import random
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane import resource
from tests.chaos.harness import (
    Stack,
    answered_by,
    errors_after,
    healthz,
    mesh_text,
    pid_of,
    push_seconds,
    rss_mb,
    services_mesh,
    write_atomic,
)
from tests.support.procs import wait_for
from tests.support.xds_client import AdsClient, node


def _random_name(rng: random.Random, length: int = 12) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


async def _invent(port: int, count: int, seed: int,
                  while_connected: Callable[[], Any]) -> tuple[int, Any]:
    """``count`` ADS streams (half SotW, half delta) with invented node ids, services and
    namespaces; each waits for its first CDS response; ``while_connected()`` runs with
    all of them open, then all disconnect."""
    rng = random.Random(seed)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(8)]
    clients: list[AdsClient] = []
    answered = 0
    try:
        for i in range(count):
            client = AdsClient(channels[i % len(channels)], delta=i % 2 == 1)
            clients.append(client)
            await client.send(node=node(f"ghost-{_random_name(rng, 20)}",
                                        f"svc-{_random_name(rng)}",
                                        namespace=f"ns-{_random_name(rng, 6)}"),
                              type_url=resource.CLUSTER)
        for client in clients:
            with contextlib.suppress(TimeoutError):
                await client.recv(30)
                answered += 1
        seen = while_connected()
    finally:
        for client in clients:
            await client.close()
        for channel in channels:
            await channel.close()
    return answered, seen


def _series_with(text: str, marker: str) -> list[str]:
    return [line for line in text.splitlines() if marker in line and not line.startswith("#")]


def _invented_folders(store: Path) -> list[str]:
    """Snapshot store folders of invented groups (their services are all svc-...)."""
    return [p.name for p in store.iterdir() if "svc-" in p.name] if store.exists() else []


def invented_identities(stack: Stack, count: int, ttl_env: dict[str, str],
                        ttl_seconds: float) -> dict[str, Any]:
    """``count`` connections with invented identities, then gone: after the group TTL no
    group, stored snapshot folder or metric series of theirs is left, and RSS is back
    near where it started."""
    first = stack.backend("reviews-1")
    write_atomic(stack.mesh, mesh_text({"reviews": [first]}))
    server = stack.server(env=ttl_env)
    envoy = stack.envoy("frontend-1", server.xds_port)
    wait_for(lambda: answered_by(envoy, "reviews", "reviews-1"), what="reviews routed")
    real_groups = set(server.json("/debug/snapshots"))
    store = stack.workdir / "snapshots"
    rss_before = rss_mb(pid_of(server))

    started = time.monotonic()
    answered, (peak_groups, rss_peak) = asyncio.run(_invent(
        server.xds_port, count, seed=count,
        while_connected=lambda: (len(server.json("/debug/snapshots")), rss_mb(pid_of(server)))))
    connect_seconds = time.monotonic() - started
    assert answered == count, f"only {answered} of {count} invented proxies got config"

    gone = time.monotonic()
    wait_for(lambda: set(server.json("/debug/snapshots")) == real_groups,
             timeout=ttl_seconds + 30, interval=0.25,
             what=f"the invented groups forgotten after the {ttl_seconds}s TTL")
    forgotten_seconds = time.monotonic() - gone
    _, metrics_text, _ = server.get("/metrics")
    left_series = _series_with(metrics_text, "svc-")
    assert not left_series, f"metric series of forgotten groups: {left_series[:5]}"
    wait_for(lambda: not _invented_folders(store), timeout=10,
             what="the stored snapshots of forgotten groups removed")
    rss_after = rss_mb(pid_of(server))
    assert healthz(server) == 200
    assert answered_by(envoy, "reviews", "reviews-1")
    return {"connections": count, "answered": answered,
            "connect_seconds": round(connect_seconds, 2), "peak_groups": peak_groups,
            "groups_after": len(real_groups), "forgotten_seconds": round(forgotten_seconds, 2),
            "rss_mb_before": round(rss_before, 1),
            "rss_mb_peak": round(rss_peak, 1), "rss_mb_after": round(rss_after, 1)}


async def _abuse(port: int) -> dict[str, Any]:
    """A 1 MB node id, and 2000 unknown type URLs on one stream: each refused with a
    gRPC status that names the bound."""
    outcome: dict[str, Any] = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = AdsClient(channel)
        await client.send(node=node("x" * 1024 * 1024), type_url=resource.CLUSTER)
        await asyncio.wait_for(client._reader, 15)
        assert client.error is not None, "a 1 MB node id was served"
        outcome["big_node_id"] = f"{client.error.code().name}: {client.error.details()}"
        await client.close()

        client = AdsClient(channel)
        await client.send(node=node("abuser-1"), type_url=resource.CLUSTER)
        await client.recv(15)
        sent = 0
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError,
                                 asyncio.InvalidStateError):
            for i in range(2000):
                if client.error is not None or client._reader.done():
                    break
                await client.send(type_url=f"type.googleapis.com/made.up.Type{i}")
                sent += 1
        await asyncio.wait_for(asyncio.shield(client._reader), 15)
        assert client.error is not None, "2000 unknown type URLs were all kept"
        outcome["unknown_types_sent_before_refusal"] = sent
        outcome["unknown_types"] = f"{client.error.code().name}: {client.error.details()}"
        await client.close()
    return outcome


def abusive_clients(stack: Stack) -> dict[str, Any]:
    """Clients past every bound are refused with a clear status; the log stays small, the
    server stays up and the real sidecar keeps being served."""
    first = stack.backend("reviews-1")
    write_atomic(stack.mesh, mesh_text({"reviews": [first]}))
    server = stack.server()
    envoy = stack.envoy("frontend-1", server.xds_port)
    wait_for(lambda: answered_by(envoy, "reviews", "reviews-1"), what="reviews routed")
    offset = server.log_path.stat().st_size
    outcome = asyncio.run(_abuse(server.xds_port))
    log_bytes = server.log_path.stat().st_size - offset
    assert "node.id" in outcome["big_node_id"], outcome
    assert outcome["big_node_id"].startswith(("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"))
    # The server ends the stream with RESOURCE_EXHAUSTED naming the bound. A client still
    # writing hundreds of requests when that status lands may see its own core's
    # "INTERNAL: Internal error from Core" instead; then the server's count says it refused.
    metrics_text = server.get("/metrics")[1]
    assert 'controlplane_xds_streams_refused_total{reason="unknown_types"} 1.0' in (
        metrics_text), outcome
    if not outcome["unknown_types"].startswith("INTERNAL: Internal error from Core"):
        assert outcome["unknown_types"].startswith("RESOURCE_EXHAUSTED"), outcome
        assert "type" in outcome["unknown_types"].lower(), outcome
    assert log_bytes < 256 * 1024, f"{log_bytes} bytes of log for two abusive streams"
    assert healthz(server) == 200
    assert answered_by(envoy, "reviews", "reviews-1")
    return {**outcome, "log_bytes": log_bytes}


async def _stall(port: int, count: int) -> None:
    """``count`` clients that ask for every cluster and never read, so the server's
    writes block on flow control; then they vanish mid-write."""
    # No window growth: 64 KB of unread responses and the server's writes must wait.
    options = [("grpc.http2.bdp_probe", 0)]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
                for _ in range(count)]
    calls = []
    try:
        for i, channel in enumerate(channels):
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources()
            await call.write(discovery_pb2.DiscoveryRequest(
                node=node(f"staller-{i}", "frontend"), type_url=resource.CLUSTER))
            for type_url in (resource.LISTENER, resource.ROUTE):
                await call.write(discovery_pb2.DiscoveryRequest(type_url=type_url))
            calls.append(call)
        await asyncio.sleep(1.5)  # the state under test: writes blocked on full windows
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close(grace=None)


def stalled_clients(stack: Stack, services: int, count: int) -> dict[str, Any]:
    """Clients that stop reading and then disconnect in the middle of a blocked write are
    a normal event: no error or traceback logged, and the real sidecar keeps getting
    changes."""
    base, moved = stack.backend("base"), stack.backend("moved")
    write_atomic(stack.mesh, services_mesh([base.port], services))
    server = stack.server()
    envoy = stack.envoy("frontend-1", server.xds_port)
    wait_for(lambda: answered_by(envoy, "svc-0", "base"), timeout=30, what="svc-0 routed")
    offset = server.log_path.stat().st_size
    asyncio.run(_stall(server.xds_port, count))
    wait_for(lambda: len([p for p in server.json("/debug/proxies")
                          if p["node_id"].startswith("staller-")]) == 0, timeout=30,
             what="the stalled streams closed")
    seconds = push_seconds(stack, envoy, {"moved": moved}, "svc-0", 30)
    errors = errors_after(server, offset)
    assert not errors, f"a client going away was logged as an error: {errors[:2]}"
    with open(server.log_path, "rb") as handle:
        handle.seek(offset)
        gone = [line for line in handle.read().decode(errors="replace").splitlines()
                if '"xds.client_gone"' in line and '"level": "info"' in line]
    assert gone, "no write was interrupted: the scenario did not block the server"
    assert healthz(server) == 200
    return {"stalled_clients": count, "services": services,
            "interrupted_writes_logged_at_info": len(gone),
            "push_seconds_after": round(seconds, 3)}
