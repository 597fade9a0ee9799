"""Which services a sidecar sees: the mesh's scoping rules applied to one proxy.

Interface shared by the assembly (which serves each group only its visible set) and the
scoping rules (``sidecars`` in the mesh file, ``exportTo`` on a service). Pure.
"""

from __future__ import annotations

from controlplane.mesh.attach import attach
from controlplane.mesh.model import Mesh
from controlplane.mesh.scope import targets
from controlplane.proxy import ProxyIdentity


def visible_services(mesh: Mesh, proxy: ProxyIdentity) -> frozenset[str] | None:
    """The keys (``name.namespace``) of the services ``proxy`` may reach, or None when it
    sees every service (so groups that see everything share the full layers).

    The most specific ``sidecars`` entry wins (the one selecting the proxy's service over
    the one for its whole namespace); with none, every service exported to the proxy's
    namespace. A proxy always sees its own service, and every service a visible one
    routes to (split, match, fallback). Indexed once per mesh, so a call costs about the
    size of its answer, and proxies under one entry get the same frozenset object."""
    seen = mesh.scope.visible(proxy.service, proxy.namespace)
    if seen is None or not (mesh.http_routes or mesh.grpc_routes):
        return seen
    return with_route_targets(mesh, seen)


def with_route_targets(mesh: Mesh, seen: frozenset[str]) -> frozenset[str] | None:
    """``seen`` and every service the Gateway API routes of a seen service send to
    (backends, mirrors), and where those route in turn: a route to a cluster the
    sidecar lacks would fail. None when that is every service."""
    attached = attach(mesh)
    by_key = mesh.by_key
    found = set(seen)
    todo = list(seen)
    while todo:
        key = todo.pop()
        service = by_key.get(key)
        more = [*attached.targets(key), *(targets(service) if service is not None else ())]
        for target in more:
            if target not in found and target in by_key:
                found.add(target)
                todo.append(target)
    if len(found) == len(by_key):
        return None
    return seen if len(found) == len(seen) else frozenset(found)
