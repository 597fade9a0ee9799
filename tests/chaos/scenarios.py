"""The chaos scenarios, each against real processes: ``controlplane serve``, Envoy
sidecars from ``controlplane bootstrap``, HTTP backends. Each returns its figures and
raises AssertionError when a promise is broken; tests/chaos/test_*.py and bench/chaos.py
both run them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import string
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane import resource
from tests.chaos.harness import (
    Stack,
    answered_by,
    connected,
    healthz,
    mesh_text,
    pid_of,
    rss_mb,
    server_sees,
    wait_reconnected,
    write_atomic,
)
from tests.support.procs import ControlPlane, Envoy, wait_for
from tests.support.xds_client import AdsClient, node


def kill_and_restart(stack: Stack, down_seconds: float = 1.0,
                     graceful: bool = False) -> dict[str, Any]:
    """SIGKILL (or, ``graceful``, SIGTERM as a rollout does) the server under traffic,
    restart it on the same port: no request fails, the sidecar reconnects, and a later
    change still reaches it. A SIGTERM ends the server cleanly: exit code 0, no error
    logged."""
    first, second = stack.backend("reviews-1"), stack.backend("reviews-2")
    write_atomic(stack.mesh, mesh_text({"reviews": [first]}))
    server = stack.server()
    envoy = stack.envoy("frontend-1", server.xds_port)
    wait_for(lambda: answered_by(envoy, "reviews", "reviews-1"), what="reviews routed")
    traffic = stack.run_traffic(envoy, "reviews")
    wait_for(lambda: traffic.ok >= 20, what="traffic flowing")

    assert server.proc is not None
    offset = server.log_path.stat().st_size
    if graceful:
        server.proc.terminate()  # our own child, by its handle
        assert server.proc.wait(15) == 0, f"exit code {server.proc.returncode}"
        errors = _errors_after(server, offset)
        assert not errors, f"a SIGTERM logged errors: {errors[:3]}"
    else:
        server.proc.kill()
        server.proc.wait(10)
    killed = time.monotonic()
    wait_for(lambda: not connected(envoy), what="the sidecar noticing the server is gone")
    served_while_down = traffic.ok
    wait_for(lambda: traffic.ok >= served_while_down + int(20 * down_seconds),
             what="traffic flowing with no control plane")
    served_while_down = traffic.ok - served_while_down

    restarted = time.monotonic()
    server.start()
    ready = time.monotonic()
    reconnect = wait_reconnected(envoy, server)

    changed = time.monotonic()
    write_atomic(stack.mesh, mesh_text({"reviews": [second]}))
    wait_for(lambda: answered_by(envoy, "reviews", "reviews-2"), timeout=15,
             interval=0.05, what="a change after the restart reaching the sidecar")
    change_seconds = time.monotonic() - changed
    traffic.stop()
    assert traffic.failed == 0, traffic.summary()
    return {"traffic": traffic.summary(), "served_while_down": served_while_down,
            "down_seconds": round(restarted - killed, 2),
            "server_start_seconds": round(ready - restarted, 2),
            "reconnect_seconds_after_ready": round(reconnect, 2),
            "change_after_restart_seconds": round(change_seconds, 2)}


def _errors_after(server: ControlPlane, offset: int) -> list[str]:
    with open(server.log_path, "rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    return [line for line in text.splitlines()
            if '"level": "error"' in line or '"level": "critical"' in line
            or line.startswith("Traceback")]


class TwoServerEnvoy(Envoy):
    """A sidecar whose xDS cluster lists two replicas, as a Service in front of two
    control plane pods would: each reconnect may go to either one."""

    other_port = 0

    def _bootstrap(self) -> None:
        super()._bootstrap()
        config = yaml.safe_load(self.config.read_text())
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == "xds_cluster":
                (locality,) = cluster["load_assignment"]["endpoints"]
                (first,) = locality["lb_endpoints"]
                second = yaml.safe_load(yaml.safe_dump(first))
                second["endpoint"]["address"]["socket_address"]["port_value"] = self.other_port
                locality["lb_endpoints"].append(second)
        self.config.write_text(yaml.safe_dump(config))


_CONFIG_STATS = ("cluster_manager.cds.version", "listener_manager.lds.version",
                 "cluster_manager.cluster_modified", "cluster_manager.cluster_added",
                 "listener_manager.listener_modified", "listener_manager.listener_added",
                 "cluster_manager.cds.update_rejected", "listener_manager.lds.update_rejected")


def failover(stack: Stack) -> dict[str, Any]:
    """Two replicas on one mesh file; the one the sidecar is connected to is killed: the
    sidecar moves to the other with no failed request and no config change (versions are
    content hashes, the same on both)."""
    first = stack.backend("reviews-1")
    write_atomic(stack.mesh, mesh_text({"reviews": [first]}))
    a, b = stack.server(), stack.server()
    TwoServerEnvoy.other_port = b.xds_port
    envoy = stack.envoy("frontend-1", a.xds_port, cls=TwoServerEnvoy)
    wait_for(lambda: answered_by(envoy, "reviews", "reviews-1"), what="reviews routed")
    on, other = wait_for(lambda: (a, b) if server_sees(a, "frontend-1")
                         else (b, a) if server_sees(b, "frontend-1") else None,
                         what="the sidecar on one replica")
    assert not server_sees(other, "frontend-1"), "the sidecar is on both replicas"
    traffic = stack.run_traffic(envoy, "reviews")
    wait_for(lambda: traffic.ok >= 20, what="traffic flowing")
    before = {name: envoy.stat(name) for name in _CONFIG_STATS}
    assert before["cluster_manager.cds.version"] != 0, before

    assert on.proc is not None
    on.proc.kill()
    on.proc.wait(10)
    killed = time.monotonic()
    wait_for(lambda: server_sees(other, "frontend-1"), timeout=30, interval=0.05,
             what="the sidecar on the other replica")
    failover_seconds = time.monotonic() - killed
    wait_for(lambda: traffic.ok >= 20 + 20, what="traffic after the failover")
    traffic.stop()
    after = {name: envoy.stat(name) for name in _CONFIG_STATS}
    assert traffic.failed == 0, traffic.summary()
    assert after == before, f"the sidecar's config changed on failover: {before} -> {after}"
    (proxy,) = [p for p in other.json("/debug/proxies") if p["node_id"] == "frontend-1"]
    assert all(t["last_nack"] is None for t in proxy["types"].values()), proxy
    return {"traffic": traffic.summary(), "failover_seconds": round(failover_seconds, 2),
            "config_stats_unchanged": after == before}


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


class Storm:
    """``concurrency`` clients asking /debug/config_dump over and over, on their own
    thread and loop, until stopped (bounded by ``max_seconds``)."""

    def __init__(self, server: ControlPlane, node_id: str, concurrency: int,
                 max_seconds: float = 60.0) -> None:
        self.url = f"http://127.0.0.1:{server.admin_port}/debug/config_dump?node={node_id}"
        self.concurrency = concurrency
        self.max_seconds = max_seconds
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True,
                                        name="storm")

    async def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

            async def client() -> None:
                while not self._stop.is_set() and time.monotonic() < deadline:
                    try:
                        async with session.get(self.url) as response:
                            await response.read()
                            self.statuses[response.status] = \
                                self.statuses.get(response.status, 0) + 1
                    except (aiohttp.ClientError, TimeoutError):
                        self.errors += 1

            await asyncio.gather(*(client() for _ in range(self.concurrency)))

    def __enter__(self) -> Storm:
        self._thread.start()
        wait_for(lambda: sum(self.statuses.values()) >= self.concurrency, timeout=60,
                 what="the debug storm under way")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(40)


def _push_seconds(stack: Stack, envoy: Envoy, backends: dict[str, Any], service: str,
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


def debug_storm(stack: Stack, services: int, concurrency: int, bound_seconds: float,
                changes: int = 1) -> dict[str, Any]:
    """A mesh change reaches a sidecar about as fast during a storm of
    /debug/config_dump requests as without one (``changes`` of each, medians compared);
    /healthz stays responsive through it."""
    base, moved = stack.backend("base"), stack.backend("moved")
    write_atomic(stack.mesh, yaml.safe_dump({"services": [
        {"name": f"svc-{i}", "port": 9080,
         "endpoints": [{"address": "127.0.0.1", "port": base.port}]}
        for i in range(services)]}))
    server = stack.server()
    envoy = stack.envoy("frontend-1", server.xds_port)
    wait_for(lambda: answered_by(envoy, "svc-0", "base"), timeout=30, what="svc-0 routed")
    wait_for(lambda: server_sees(server, "frontend-1"), what="the sidecar ACKed")
    backends = {"moved": moved}
    quiet = [_push_seconds(stack, envoy, backends, f"svc-{i}", 30) for i in range(changes)]
    healthz_worst = 0.0
    with Storm(server, "frontend-1", concurrency) as storm:
        stormy = []
        for i in range(changes, 2 * changes):
            stormy.append(_push_seconds(stack, envoy, backends, f"svc-{i}", 30))
            started = time.monotonic()
            assert healthz(server) == 200
            healthz_worst = max(healthz_worst, time.monotonic() - started)
    assert max(stormy) < bound_seconds, \
        f"a change took {max(stormy):.2f}s to reach the sidecar during the storm " \
        f"(without: {max(quiet):.2f}s)"
    assert healthz_worst < bound_seconds, f"/healthz took {healthz_worst:.2f}s in the storm"
    return {"services": services, "concurrency": concurrency, "changes": changes,
            "push_seconds_quiet_median": round(statistics.median(quiet), 3),
            "push_seconds_storm_median": round(statistics.median(stormy), 3),
            "push_seconds_quiet": [round(x, 3) for x in quiet],
            "push_seconds_storm": [round(x, 3) for x in stormy],
            "healthz_worst_seconds_storm": round(healthz_worst, 3),
            "debug_responses": dict(sorted(storm.statuses.items())),
            "debug_client_errors": storm.errors}


def workdir_for(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    assert outcome["unknown_types"].startswith(("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"))
    assert "type" in outcome["unknown_types"].lower(), outcome
    assert log_bytes < 256 * 1024, f"{log_bytes} bytes of log for two abusive streams"
    assert healthz(server) == 200
    assert answered_by(envoy, "reviews", "reviews-1")
    return {**outcome, "log_bytes": log_bytes}


def _mesh_of(backend_ports: list[int], services: int) -> str:
    return yaml.safe_dump({"services": [
        {"name": f"svc-{i}", "port": 9080,
         "endpoints": [{"address": "127.0.0.1", "port": port} for port in backend_ports]}
        for i in range(services)]})


def big_mesh(stack: Stack, services: int, endpoints: int) -> dict[str, Any]:
    """A big mesh file saved over a small one, then the small one again: /healthz stays
    responsive while the big one is read, the sidecar gets it, and the server's memory
    comes back near where it was."""
    backend = stack.backend("base")
    ports = [backend.port] + [backend.port + 1 + i for i in range(endpoints - 1)]
    small = _mesh_of([backend.port], 2)
    write_atomic(stack.mesh, small)
    server = stack.server()
    envoy = stack.envoy("frontend-1", server.xds_port)
    wait_for(lambda: answered_by(envoy, "svc-1", "base"), what="svc-1 routed")
    rss_before = rss_mb(pid_of(server))
    text = _mesh_of(ports, services)
    last = f"svc-{services - 1}"

    written = time.monotonic()
    write_atomic(stack.mesh, text)
    healthz_worst = 0.0
    deadline = written + 120
    while time.monotonic() < deadline:
        started = time.monotonic()
        assert healthz(server) == 200
        healthz_worst = max(healthz_worst, time.monotonic() - started)
        if envoy.request(last)[0] == 200:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"{last} never reached the sidecar")
    applied = time.monotonic() - written
    rss_big = rss_mb(pid_of(server))

    write_atomic(stack.mesh, small)
    wait_for(lambda: envoy.request(last)[0] == 404, timeout=60, what=f"{last} removed")
    wait_for(lambda: answered_by(envoy, "svc-1", "base"), what="svc-1 still routed")
    rss_after = rss_mb(pid_of(server))
    return {"services": services, "endpoints_per_service": endpoints,
            "file_mb": round(len(text) / 1e6, 2), "applied_seconds": round(applied, 2),
            "healthz_worst_seconds": round(healthz_worst, 3),
            "rss_mb_before": round(rss_before, 1), "rss_mb_big": round(rss_big, 1),
            "rss_mb_after": round(rss_after, 1)}


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
    write_atomic(stack.mesh, _mesh_of([base.port], services))
    server = stack.server()
    envoy = stack.envoy("frontend-1", server.xds_port)
    wait_for(lambda: answered_by(envoy, "svc-0", "base"), timeout=30, what="svc-0 routed")
    offset = server.log_path.stat().st_size
    asyncio.run(_stall(server.xds_port, count))
    wait_for(lambda: len([p for p in server.json("/debug/proxies")
                          if p["node_id"].startswith("staller-")]) == 0, timeout=30,
             what="the stalled streams closed")
    seconds = _push_seconds(stack, envoy, {"moved": moved}, "svc-0", 30)
    errors = _errors_after(server, offset)
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
