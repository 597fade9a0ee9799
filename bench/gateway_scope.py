"""What a gateway proxy is served in a big mesh, scoped to its routes' backends, against
what it was served when it saw every service; and whether a change to a service it does
not route to reaches it.

In process (the real assembly, ``MeshBuild``, as the server runs it): the generated
mesh (``meshgen``: M http services ``svc-0000``..., two endpoints each) plus a Gateway
``ingress`` with one HTTP listener and one HTTPRoute per routed service (R of them, the
last services of the mesh). Printed per xDS type: resources and bytes as sent (SotW
encoding) for the gateway now and for the whole-mesh layers it used to get; then an
endpoint change to svc-0000 (routed by no route): whether the gateway's snapshot is
still the same object (no push) and how long its rebuild took.

    .venv/bin/python bench/gateway_scope.py [--services 200] [--routed 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import add_output_flags, results_path, write_results
from meshgen import CHANGED_PORTS, MeshSpec, mesh_yaml, service_name

from controlplane import resource
from controlplane.assembly.build import MeshBuild
from controlplane.mesh import Mesh, load_mesh_data
from controlplane.mesh.loader import parse_mesh_yaml
from controlplane.proxy import GATEWAY, ProxyIdentity

BASELINE = "gateway_scope.json"
PROXY = ProxyIdentity(node_id="ingress-1", service="ingress", kind=GATEWAY, gateway="ingress")


def mesh(services: int, routed: int, changed_port: int) -> Mesh:
    text = mesh_yaml(MeshSpec(services=services), changed_port)
    data = parse_mesh_yaml(text)
    data["gateways"] = [{"name": "ingress", "listeners": [
        {"name": "http", "port": 8080, "protocol": "HTTP"}]}]
    data["http_routes"] = [
        {"name": f"route-{n}", "parentRefs": [{"name": "ingress"}],
         "hostnames": [f"{name}.example.com"],
         "rules": [{"backendRefs": [{"name": name, "port": 9080}]}]}
        for n, name in enumerate(service_name(services - 1 - i) for i in range(routed))]
    return load_mesh_data(data)


def run(services: int, routed: int) -> dict[str, Any]:
    first = MeshBuild(mesh(services, routed, CHANGED_PORTS[1]))
    started = time.perf_counter()
    scoped = first.snapshot(PROXY)
    built_s = time.perf_counter() - started
    whole = {resource.CLUSTER: first.cluster_layer(None),
             resource.ENDPOINT: first.endpoint_layer(None)}
    types: dict[str, Any] = {}
    for type_url, typed in scoped.types.items():
        name = resource.short_name(type_url)
        before = whole.get(type_url)
        types[name] = {
            "resources": len(typed.resources), "bytes": typed.size,
            "resources_unscoped": len(before) if before is not None else len(typed.resources),
            "bytes_unscoped": before.size if before is not None else typed.size,
        }
    second = MeshBuild(mesh(services, routed, CHANGED_PORTS[0]), previous=first)
    started = time.perf_counter()
    again = second.snapshot(PROXY, reuse=scoped)
    rebuilt_s = time.perf_counter() - started
    unscoped_changed = [resource.short_name(t) for t, layer in
                        ((resource.CLUSTER, second.cluster_layer(None)),
                         (resource.ENDPOINT, second.endpoint_layer(None)))
                        if layer.version != whole[t].version]
    return {
        "services": services, "routed": routed, "types": types,
        "bytes": sum(t["bytes"] for t in types.values()),
        "bytes_unscoped": sum(t["bytes_unscoped"] for t in types.values()),
        "first_build_ms": round(built_s * 1000, 2),
        "unrelated_change": {
            "gateway_snapshot_unchanged": again is scoped,
            "rebuild_ms": round(rebuilt_s * 1000, 2),
            "unscoped_types_that_would_change": unscoped_changed,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=200)
    parser.add_argument("--routed", type=int, default=2)
    add_output_flags(parser, BASELINE)
    args = parser.parse_args()
    result = run(args.services, args.routed)
    for name, figures in result["types"].items():
        print(f"{name}: {figures['resources']} resources, {figures['bytes']} B "
              f"(unscoped: {figures['resources_unscoped']}, {figures['bytes_unscoped']} B)")
    print(f"total: {result['bytes']} B (unscoped: {result['bytes_unscoped']} B)")
    change = result["unrelated_change"]
    print(f"unrelated change: gateway snapshot unchanged: "
          f"{change['gateway_snapshot_unchanged']} (rebuild {change['rebuild_ms']} ms); "
          f"unscoped, {change['unscoped_types_that_would_change']} would have changed")
    write_results(results_path(BASELINE, args.out, args.update_baseline),
                  json.dumps(result, indent=2), BASELINE)


if __name__ == "__main__":
    main()
