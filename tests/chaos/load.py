"""Load on the server's other doors: a storm of debug requests, a big mesh file. Each
scenario checks that xDS and /healthz come first, returns its figures, and raises
AssertionError when a promise is broken."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from typing import Any

import aiohttp
import yaml

from tests.chaos.harness import (
    Stack,
    answered_by,
    errors_after,
    healthz,
    pid_of,
    push_seconds,
    rss_mb,
    server_sees,
    services_mesh,
    write_atomic,
)
from tests.support.procs import ControlPlane, wait_for


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
    quiet = [push_seconds(stack, envoy, backends, f"svc-{i}", 30) for i in range(changes)]
    healthz_worst = 0.0
    offset = server.log_path.stat().st_size
    with Storm(server, "frontend-1", concurrency) as storm:
        stormy = []
        for i in range(changes, 2 * changes):
            stormy.append(push_seconds(stack, envoy, backends, f"svc-{i}", 30))
            started = time.monotonic()
            assert healthz(server) == 200
            healthz_worst = max(healthz_worst, time.monotonic() - started)
    assert max(stormy) < bound_seconds, \
        f"a change took {max(stormy):.2f}s to reach the sidecar during the storm " \
        f"(without: {max(quiet):.2f}s)"
    assert healthz_worst < bound_seconds, f"/healthz took {healthz_worst:.2f}s in the storm"
    errors = errors_after(server, offset)
    assert not errors, f"the storm made the server log errors: {errors[:2]}"
    return {"services": services, "concurrency": concurrency, "changes": changes,
            "push_seconds_quiet_median": round(statistics.median(quiet), 3),
            "push_seconds_storm_median": round(statistics.median(stormy), 3),
            "push_seconds_quiet": [round(x, 3) for x in quiet],
            "push_seconds_storm": [round(x, 3) for x in stormy],
            "healthz_worst_seconds_storm": round(healthz_worst, 3),
            "debug_responses": dict(sorted(storm.statuses.items())),
            "debug_client_errors": storm.errors}


def big_mesh(stack: Stack, services: int, endpoints: int,
             returned_within_mb: float = 64) -> dict[str, Any]:
    """A big mesh file saved over a small one, then the small one again: /healthz stays
    responsive while the big one is read, the sidecar gets it, and the server's memory
    comes back near where it was."""
    backend = stack.backend("base")
    ports = [backend.port] + [backend.port + 1 + i for i in range(endpoints - 1)]
    small = services_mesh([backend.port], 2)
    write_atomic(stack.mesh, small)
    server = stack.server()
    envoy = stack.envoy("frontend-1", server.xds_port)
    wait_for(lambda: answered_by(envoy, "svc-1", "base"), what="svc-1 routed")
    rss_before = rss_mb(pid_of(server))
    text = services_mesh(ports, services)
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
    # The server reclaims at once and again a few seconds later, once the streams and
    # what their proxies ACKed no longer hold the big snapshots: poll, bounded.
    settle_deadline = time.monotonic() + 15
    rss_after = rss_mb(pid_of(server))
    while rss_after - rss_before >= returned_within_mb and time.monotonic() < settle_deadline:
        time.sleep(0.5)
        rss_after = rss_mb(pid_of(server))
    return {"services": services, "endpoints_per_service": endpoints,
            "file_mb": round(len(text) / 1e6, 2), "applied_seconds": round(applied, 2),
            "healthz_worst_seconds": round(healthz_worst, 3),
            "rss_mb_before": round(rss_before, 1), "rss_mb_big": round(rss_big, 1),
            "rss_mb_after": round(rss_after, 1)}
