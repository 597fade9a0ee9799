"""One control plane serving a mesh file and real Envoy sidecars from ``controlplane
bootstrap``, shared by the tests of one module (each test has its own services, so no
test sees another's traffic)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import ControlPlane, Envoy, Stoppable, stop_all, wait_for


def endpoint(backend: Any, **fields: Any) -> dict[str, Any]:
    """A mesh endpoint at a backend (anything with a ``port``) on 127.0.0.1."""
    return {"address": "127.0.0.1", "port": backend.port, **fields}


def service(name: str, backends: list[Any], port: int = 9080, **fields: Any) -> dict[str, Any]:
    return {"name": name, "port": port, "endpoints": [endpoint(b) for b in backends], **fields}


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mesh = tmp / "mesh.yaml"
        self.owned: list[Stoppable] = []
        self.envoys: list[Envoy] = []
        self.server: ControlPlane | None = None

    def own(self, thing: Any) -> Any:
        """Stop ``thing`` when the rig closes."""
        self.owned.append(thing)
        return thing

    def write(self, services: list[dict[str, Any]]) -> None:
        """Atomically, as editors save, so the server never reads half a file."""
        tmp = self.mesh.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"services": services}))
        tmp.replace(self.mesh)

    def serve(self, services: list[dict[str, Any]], extra: list[str] | None = None,
              env: dict[str, str] | None = None) -> ControlPlane:
        self.write(services)
        self.server = ControlPlane(self.mesh, self.tmp, extra=extra, env=env).start()
        return self.server

    def envoy(self, node_id: str, service: str = "frontend", delta: bool = False,
              extra: list[str] | None = None, app_port: int | None = None) -> Envoy:
        """A sidecar; with ``app_port``, an inbound listener on a port it picks (read
        ``inbound_port`` once started)."""
        assert self.server is not None
        envoy = Envoy(self.tmp, node_id, service, self.server.xds_port, delta, extra,
                      app_port=app_port).start()
        self.envoys.append(envoy)
        return envoy

    def close(self) -> None:
        stop_all(self.envoys, self.server, self.owned)


def cluster_stat(envoy: Envoy, service: str, name: str, port: int = 9080,
                 namespace: str = "default") -> int:
    return envoy.stat(f"cluster.outbound|{port}||{service}.{namespace}.svc.cluster.local.{name}")


def wait_endpoints(envoy: Envoy, counts: dict[str, int], port: int = 9080) -> None:
    """Until the sidecar knows every endpoint, without sending a request a test counts."""
    wait_for(lambda: all(cluster_stat(envoy, name, "membership_total", port) == count
                         for name, count in counts.items()),
             what=f"endpoints {counts}", timeout=20)


def timed(call: Any) -> tuple[Any, float]:
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: ControlPlane) -> Samples:
    status, text, _ = server.get("/metrics")
    assert status == 200, text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over every series that has ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, series), v in samples.items() if n == name and wanted <= series)
