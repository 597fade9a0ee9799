"""The generated meshes the benchmarks run on: M http services ``svc-0000``... in
namespace ``default``, optionally spread over zones, optionally scoped (a ``sidecars:``
entry per service giving its sidecar a few services to call, like Istio's Sidecar)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

NAMESPACE = "default"
SERVICE_PORT = 9080
ENDPOINT_BASE_PORT = 20000  # service i has endpoints on 20000+2i and 20001+2i
CHANGED_PORTS = (60000, ENDPOINT_BASE_PORT)  # svc-0000's first endpoint alternates
CHANGED_SERVICE = 0


def service_name(index: int) -> str:
    return f"svc-{index:04d}"


def cluster_name(index: int) -> str:
    """The outbound cluster (and ClusterLoadAssignment) the server names service ``index``."""
    return f"outbound|{SERVICE_PORT}||{service_name(index)}.{NAMESPACE}.svc.cluster.local"


CHANGED_CLUSTER = cluster_name(CHANGED_SERVICE)


def zone_name(index: int) -> str:
    return f"zone-{index}"


@dataclass(frozen=True)
class MeshSpec:
    """What to generate. ``zones`` > 0 spreads each service's two endpoints over two
    neighbouring zones; ``scoped`` > 0 lets the sidecar of service i reach only the
    ``scoped`` services before it (i-1, ..., i-scoped, wrapping), so the changed service
    svc-0000 is called by svc-0001...svc-00<scoped> (and seen by itself)."""

    services: int
    zones: int = 0
    scoped: int = 0
    # Real backends for some services (index -> port); others point at nothing.
    backends: tuple[tuple[int, int], ...] = ()

    def reachable(self, index: int) -> frozenset[int] | None:
        """The services the sidecar of service ``index`` sees (None: every one). A proxy
        always sees its own service."""
        if not self.scoped:
            return None
        count = min(self.scoped, self.services - 1)
        return frozenset({index} | {(index - j) % self.services for j in range(1, count + 1)})

    def sees_changed(self, index: int) -> bool:
        visible = self.reachable(index)
        return visible is None or CHANGED_SERVICE in visible


def mesh_yaml(spec: MeshSpec, changed_port: int = CHANGED_PORTS[-1]) -> str:
    """The mesh file; svc-0000's first endpoint is on ``changed_port``."""
    backends = dict(spec.backends)
    lines = ["services:"]
    for i in range(spec.services):
        if i in backends:
            ports = [backends[i]]
        else:
            first = changed_port if i == CHANGED_SERVICE else ENDPOINT_BASE_PORT + 2 * i
            ports = [first, ENDPOINT_BASE_PORT + 2 * i + 1]
        lines += [f"  - name: {service_name(i)}", f"    namespace: {NAMESPACE}",
                  f"    port: {SERVICE_PORT}", "    protocol: http", "    endpoints:"]
        for n, port in enumerate(ports):
            zone = f", zone: {zone_name((i + n) % spec.zones)}" if spec.zones else ""
            lines.append(f"      - {{address: 127.0.0.1, port: {port}{zone}}}")
    if spec.scoped:
        lines.append("sidecars:")
        for i in range(spec.services):
            visible = spec.reachable(i) or frozenset()
            hosts = ", ".join(f"{NAMESPACE}/{service_name(j)}" for j in sorted(visible - {i}))
            lines += [f"  - name: {service_name(i)}", f"    namespace: {NAMESPACE}",
                      f"    workloadSelector: {{service: {service_name(i)}}}",
                      f"    egress: [{{hosts: [{hosts}]}}]"]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Write a temporary file beside ``path``, then rename it over ``path`` (what an
    editor or a config-management tool does on save)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def proxy_identities(streams: int, groups: int, zones: int) -> list[tuple[int, str]]:
    """(service index, zone) of each stream: stream i is a sidecar of service i % groups,
    in zone i % zones (no zone when zones is 0)."""
    return [(i % groups, zone_name(i % zones) if zones else "") for i in range(streams)]


def group_count(identities: Sequence[tuple[int, str]]) -> int:
    """Distinct (service, zone) pairs: the snapshot groups the server will keep."""
    return len(set(identities))
