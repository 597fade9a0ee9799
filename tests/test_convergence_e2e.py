"""Convergence measured by the server, end to end: the real `controlplane serve` process,
real Envoy sidecars, a mesh file edited (and, below, an EndpointSlice changed through the
API server double). The figure the server reports (/debug/changes, the histogram, the
``change.converged`` line) is checked against one taken from outside: from the write
until each Envoy's own admin shows the new endpoint."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kube.objects import endpoint_slice, service
from tests.support.procs import Backend, ControlPlane, Envoy, wait_for
from tests.support.promise_rig import Rig, scrape, value
from tests.support.promise_rig import service as mesh_service
from tests.test_kube_e2e import FAST, REVIEWS, Cluster, envoy_hosts

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

WARN_AFTER = 3.0
NODES = ("frontend-1", "frontend-2", "frontend-3")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    yield made
    made.close()


def _has_port(envoy: Envoy, port: int) -> bool:
    status, body, _ = envoy.admin("/clusters")
    return status == 200 and f"::127.0.0.1:{port}::" in body


def _logged(server: ControlPlane, event: str, **fields: Any) -> list[dict[str, Any]]:
    return [line for line in server.logs() if line.get("event") == event
            and all(line.get(k) == v for k, v in fields.items())]


def _change(server: ControlPlane, generation: int) -> dict[str, Any] | None:
    for change in server.json("/debug/changes")["changes"]:
        if change["generation"] == generation:
            return dict(change)
    return None


def _generation(server: ControlPlane) -> int:
    return max((line["generation"] for line in _logged(server, "mesh.accepted")), default=0)


def _edit(rig: Rig, envoys: list[Envoy], backends: list[Backend],
          timeout: float = 15.0) -> tuple[float, dict[str, float]]:
    """Write reviews with ``backends``; seconds from the write until each Envoy shows the
    last one (polled in turn, every few ms). Returns the write's wall-clock time too."""
    written = time.time()
    rig.write([mesh_service("reviews", backends)])
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(envoys) and time.monotonic() < deadline:
        for envoy in envoys:
            if envoy.node_id not in seen and _has_port(envoy, backends[-1].port):
                seen[envoy.node_id] = time.time() - written
        time.sleep(0.005)
    assert len(seen) == len(envoys), f"only {sorted(seen)} took the change"
    return written, seen


def test_an_edit_converges_on_every_sidecar_as_seen_from_outside(rig: Rig) -> None:
    one, two, three = (rig.own(Backend(f"reviews-{i}")) for i in (1, 2, 3))
    server = rig.serve([mesh_service("reviews", [one])],
                       extra=["--convergence-warn-after", str(WARN_AFTER)])
    envoys = [rig.envoy(NODES[0]), rig.envoy(NODES[1]), rig.envoy(NODES[2], delta=True)]
    wait_for(lambda: all(_has_port(e, one.port) for e in envoys), what="first endpoints")
    wait_for(lambda: not any(c["result"] == "pending"
                             for c in server.json("/debug/changes")["changes"]),
             what="nothing pending before the edit")
    before = value(scrape(server), "controlplane_convergence_seconds_count", type="endpoint")
    generation = _generation(server)

    written, outside = _edit(rig, envoys, [one, two])

    wait_for(lambda: _logged(server, "change.converged", generation=generation + 1),
             what="change.converged logged", timeout=WARN_AFTER + 5)
    [line] = _logged(server, "change.converged", generation=generation + 1)
    assert line["proxies"] == 3 and line["level"] == "info"
    change = _change(server, generation + 1)
    assert change is not None and change["complete"] and change["result"] == "converged"
    assert change["affected"] == 3 and change["acked"] == 3 and change["laggards"] == []
    # The clock starts at the save: the file's mtime, which the kernel stamps with a
    # coarse clock (a few ms behind time.time()).
    assert written - 0.02 <= change["observed_at"] <= written + 1.0
    assert change["observed_at"] <= change["published_at"]
    # Each ACK follows the Envoy applying the config, which the outside poll sees a few
    # ms later at best; the outside figure also holds the notification's delay and the
    # poll's step.
    slowest = max(outside.values())
    assert change["seconds"]["max"] == line["seconds"]
    assert change["seconds"]["max"] <= slowest + 0.05, (change, outside)
    assert change["seconds"]["max"] >= slowest - 1.0, (change, outside)
    assert change["seconds"]["p50"] <= change["seconds"]["p99"] <= change["seconds"]["max"]
    after = value(scrape(server), "controlplane_convergence_seconds_count", type="endpoint")
    assert after >= before + 3
    assert value(scrape(server), "controlplane_changes_total", result="converged") >= 1
    shown = {p["node_id"]: p["convergence"] for p in server.json("/debug/proxies")}
    for node in NODES:
        assert shown[node] is not None and shown[node]["generation"] == generation + 1
        assert 0 <= shown[node]["seconds"] <= change["seconds"]["max"]
    print(f"outside {outside}, server {change['seconds']}")

    # A sidecar that stays connected but takes nothing (stopped): the change does not
    # converge, and the warning names it.
    stuck = envoys[1]
    assert stuck.proc is not None
    os.kill(stuck.proc.pid, signal.SIGSTOP)
    try:
        _, outside = _edit(rig, [envoys[0], envoys[2]], [one, two, three])
        wait_for(lambda: _logged(server, "change.not_converged", generation=generation + 2),
                 what="change.not_converged logged", timeout=WARN_AFTER + 10)
    finally:
        os.kill(stuck.proc.pid, signal.SIGCONT)
    [warning] = _logged(server, "change.not_converged", generation=generation + 2)
    assert warning["level"] == "warning"
    assert warning["laggards"] == [stuck.node_id] and warning["not_converged"] == 1
    assert warning["converged"] == 2 and "NACK" in warning["hint"]
    change = _change(server, generation + 2)
    assert change is not None and change["result"] == "not_converged"
    assert not change["complete"] and change["laggards"] == [stuck.node_id]
    assert change["acked"] == 2 and change["pending"] == 1
    assert value(scrape(server), "controlplane_changes_total", result="not_converged") >= 1
    # Back, it catches up on its own (the change is no longer followed: no new line).
    wait_for(lambda: _has_port(stuck, three.port), what="the stopped sidecar catches up")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path)
    yield made
    made.close()


def _slice(cluster: Cluster, *addresses: str) -> None:
    builder = endpoint_slice("reviews-abc", service="reviews").port(8080, name="http")
    for address in addresses:
        builder.endpoint(address)
    cluster.api.apply(builder.build())


def test_an_endpointslice_change_converges_from_its_watch_event(cluster: Cluster) -> None:
    """The clock starts at the watch event, not at the end of the debounce: the mesh is
    published at least ``quiet`` seconds after the event that started its batch."""
    quiet = 0.4
    cluster.api.create(service("reviews").port(9080, name="http", target="http").build())
    _slice(cluster, "192.0.2.10")  # TEST-NET-1: never dialled, only served
    cluster.serve(env={**FAST, "CONTROLPLANE_DEBOUNCE_QUIET": str(quiet)})
    server = cluster.server
    assert server is not None
    envoy = cluster.envoy()
    wait_for(lambda: "192.0.2.10" in envoy_hosts(envoy), what="first endpoints")
    generation = _generation(server)

    changed = time.time()
    _slice(cluster, "192.0.2.10", "192.0.2.11")
    wait_for(lambda: "192.0.2.11" in envoy_hosts(envoy), what="the new endpoint")
    wait_for(lambda: _logged(server, "change.converged", generation=generation + 1),
             what="change.converged logged", timeout=10)
    [line] = _logged(server, "change.converged", generation=generation + 1)
    assert line["proxies"] == 1
    change = _change(server, generation + 1)
    assert change is not None and change["complete"]
    assert changed <= change["observed_at"] <= changed + 1.0
    assert change["published_at"] - change["observed_at"] >= quiet
    assert change["seconds"]["max"] >= quiet  # the debounce is part of the figure
    [proxy] = [p for p in server.json("/debug/proxies") if p["node_id"] == "frontend-1"]
    assert proxy["convergence"]["generation"] == generation + 1
    assert REVIEWS in envoy.admin("/clusters")[1]
    with contextlib.suppress(Exception):  # (a cheap look at the metric, for the reader)
        print(value(scrape(server), "controlplane_convergence_seconds_sum", type="endpoint"))
