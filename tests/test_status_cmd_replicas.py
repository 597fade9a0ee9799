"""Two replicas on one mesh file, with a short max connection age: a real Envoy whose xDS
cluster lists both (as a Service in front of two pods would) is sent away every ~2 s and
reconnects to either replica; its config never changes (the replicas serve the same
content-hash versions), and ``controlplane status`` over both lists it once, with the
replica that serves it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.bootstrap_xds import XDS_CLUSTER
from tests.support.procs import Backend, ControlPlane, Envoy, wait_for
from tests.test_csds import write_mesh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
AGE = ["--max-connection-age", "2", "--max-connection-age-grace", "1"]


class TwoServerEnvoy(Envoy):
    """A sidecar whose xDS cluster has a second endpoint: the other replica."""

    def __init__(self, workdir: Path, node_id: str, service: str, ports: tuple[int, int]
                 ) -> None:
        self.other_port = ports[1]
        super().__init__(workdir, node_id, service, ports[0])

    def _bootstrap(self) -> None:
        super()._bootstrap()
        config: dict[str, Any] = yaml.safe_load(self.config.read_text())
        [cluster] = [c for c in config["static_resources"]["clusters"]
                     if c["name"] == XDS_CLUSTER]
        [group] = cluster["load_assignment"]["endpoints"]
        group["lb_endpoints"].append({"endpoint": {"address": {"socket_address": {
            "address": "127.0.0.1", "port_value": self.other_port}}}})
        self.config.write_text(yaml.safe_dump(config))


class Replicas:
    def __init__(self, tmp: Path) -> None:
        self.backend = Backend("reviews-1")
        self.mesh = tmp / "mesh.yaml"
        write_mesh(self.mesh, {"reviews": [self.backend.port]})
        self.servers: list[ControlPlane] = []
        self.envoy: Envoy | None = None
        for name in ("r1", "r2"):
            workdir = tmp / name
            workdir.mkdir()
            self.servers.append(ControlPlane(self.mesh, workdir, extra=AGE,
                                             env={"CONTROLPLANE_IDENTIFIER": name}).start())

    def close(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        for server in self.servers:
            server.stop()
        self.backend.stop()


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    found = Replicas(tmp_path)
    yield found
    found.close()


def serving(server: ControlPlane, node: str) -> list[dict[str, Any]]:
    return [p for p in server.json("/debug/proxies") if p["node_id"] == node]


def test_aged_connections_move_between_replicas_without_a_config_change(
        replicas: Replicas, tmp_path: Path) -> None:
    r1, r2 = replicas.servers
    started = [line for line in r1.logs() if line.get("event") == "serve.started"]
    assert started[-1]["max_connection_age"] == 2.0
    envoy = replicas.envoy = TwoServerEnvoy(tmp_path, "frontend-1", "frontend",
                                            (r1.xds_port, r2.xds_port)).start()
    wait_for(lambda: envoy.request("reviews")[1] == "reviews-1", what="the first route")
    created = envoy.stat("listener_manager.listener_create_success")
    modified = envoy.stat("cluster_manager.cluster_modified")

    # Over ~10 s the sidecar is sent away several times and lands on both replicas.
    seen: dict[str, dict[str, str]] = {}
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline and len(seen) < 2:
        for name, server in (("r1", r1), ("r2", r2)):
            for proxy in serving(server, "frontend-1"):
                acked = {k: s["acked_version"] for k, s in proxy["types"].items()}
                if all(acked.values()):
                    seen[name] = acked
        time.sleep(0.2)
    assert set(seen) == {"r1", "r2"}, seen
    assert seen["r1"] == seen["r2"]  # same mesh, same versions, on either replica
    opened = sum(1 for server in (r1, r2) for line in server.logs()
                 if line.get("event") == "xds.stream_opened"
                 and line.get("node_id") == "frontend-1")
    assert opened >= 2
    # Nothing changed in the sidecar: no listener made again, no cluster modified.
    assert envoy.stat("listener_manager.listener_create_success") == created
    assert envoy.stat("cluster_manager.cluster_modified") == modified
    assert envoy.request("reviews")[1] == "reviews-1"
    print(f"{opened} streams over both replicas; versions {seen['r1']}")

    # Status over both replicas: the sidecar once, with the replica that serves it.
    done = subprocess.run(
        [sys.executable, "-m", "controlplane", "status", "--server",
         f"127.0.0.1:{r1.xds_port}", "--server", f"127.0.0.1:{r2.xds_port}", "-o", "json"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    [proxy] = json.loads(done.stdout)["proxies"]
    assert proxy["node"] == "frontend-1" and proxy["replica"] in {"r1", "r2"}
