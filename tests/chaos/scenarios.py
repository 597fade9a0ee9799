"""Restarts and failovers under traffic, against real processes: ``controlplane serve``,
Envoy sidecars from ``controlplane bootstrap``, HTTP backends. Each scenario returns its
figures and raises AssertionError when a promise is broken; tests/chaos/test_*.py and
bench/chaos.py both run them (clients.py: what clients do; load.py: load on the server).
"""

from __future__ import annotations

import time
from typing import Any

import yaml

from tests.chaos.harness import (
    Stack,
    answered_by,
    connected,
    errors_after,
    mesh_text,
    server_sees,
    wait_reconnected,
    write_atomic,
)
from tests.support.procs import Envoy, wait_for


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
        errors = errors_after(server, offset)
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
