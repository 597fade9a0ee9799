"""The snapshot of an ingress gateway proxy (``ProxyIdentity.kind == "gateway"``).

Its listeners and route tables are its own (``translator/gateway``), made from its
Gateway and the routes attached to it. Its clusters and endpoints are the shared layers
every sidecar that sees every service gets: a gateway reaches any service a route sends
it to, with the same clusters (mTLS to sidecars with the same identity machinery when
the mesh has a CA), circuit breakers and load balancing. Its certificates are not in
the snapshot: the server adds them per stream (``cache/gateway_secrets.py``).
"""

from __future__ import annotations

import structlog

from controlplane import resource
from controlplane.assembly.build import MeshBuild
from controlplane.cache.layers import Layer, empty_layer
from controlplane.cache.snapshot import Snapshot, TypeSnapshot, encode_resource
from controlplane.mesh.gateway_attach import gateway_attachments
from controlplane.mesh.model import Mesh
from controlplane.proxy import ProxyIdentity
from controlplane.translator import resource_name
from controlplane.translator.gateway.translate import gateway_resources

log = structlog.get_logger("controlplane.assembly.gateway")

_MOST_REPORTED = 1_000
# What was last reported per gateway (namespace, name): a problem is logged when it
# appears, not again on every build of an unchanged one.
_reported: dict[tuple[str, str], frozenset[tuple[str, ...]]] = {}


def gateway_snapshot(build: MeshBuild, proxy: ProxyIdentity,
                     reuse: Snapshot | None = None) -> Snapshot:
    """The group's snapshot; ``reuse`` itself when nothing of it changed."""
    old = reuse.types if reuse is not None else {}
    report(build.mesh, proxy)
    own = gateway_resources(build.mesh, proxy)
    types: dict[str, TypeSnapshot] = {
        resource.CLUSTER: build.typed(resource.CLUSTER, (build.cluster_layer(None),),
                                      old.get(resource.CLUSTER)),
        resource.ENDPOINT: build.typed(resource.ENDPOINT,
                                       (build.endpoint_layer(None, proxy.zone),),
                                       old.get(resource.ENDPOINT)),
    }
    encoded = 0
    for type_url in (resource.LISTENER, resource.ROUTE):
        prior = old.get(type_url)
        made = [encode_resource(type_url, resource_name(m), m,
                                prior.resources.get(resource_name(m)) if prior else None)
                for m in own[type_url]]
        encoded += sum(r.size for r in made)
        types[type_url] = TypeSnapshot.layered(type_url, (), Layer.of(type_url, made),
                                               reuse=prior)
    types[resource.SECRET] = build.typed(resource.SECRET, (empty_layer(resource.SECRET),),
                                         old.get(resource.SECRET))
    return Snapshot.of(types, encoded, reuse)


def report(mesh: Mesh, proxy: ProxyIdentity) -> None:
    """Log what of the proxy's Gateway is not served, and the routes its listeners do
    not accept, once per change of what is wrong."""
    attachments = gateway_attachments(mesh)
    view = attachments.gateway(proxy.namespace, proxy.gateway)
    problems: set[tuple[str, ...]] = set()
    if view is None:
        problems.add(("gateway.not_found", "", "", f"no Gateway {proxy.namespace}/"
                      f"{proxy.gateway} in the mesh; the proxy serves no listener until "
                      "one is added (gateways:)"))
    else:
        for listener in view.status.listeners:
            for condition in listener.conditions:
                if condition.type != "Programmed" and condition.status == (
                        condition.type == "Conflicted"):
                    problems.add(("gateway.listener_not_served", listener.name,
                                  condition.reason, condition.message))
        for key, parents in attachments.routes.items():
            for status in parents:
                if (status.parent.namespace_or(key[1]), status.parent.name) != (
                        proxy.namespace, proxy.gateway):
                    continue
                for condition in status.conditions:
                    if not condition.status:
                        problems.add(("routes.not_accepted", "/".join(key),
                                      condition.reason, condition.message))
    where = (proxy.namespace, proxy.gateway)
    frozen = frozenset(problems)
    if _reported.get(where) == frozen:
        return
    if len(_reported) >= _MOST_REPORTED:
        _reported.clear()
    _reported[where] = frozen
    for event, subject, reason, message in sorted(frozen):
        fields = {"listener": subject} if event == "gateway.listener_not_served" \
            else {"route": subject} if subject else {}
        log.warning(event, gateway=f"{proxy.namespace}/{proxy.gateway}", reason=reason,
                    message=message, **fields)
