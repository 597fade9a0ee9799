"""A gateway proxy's own resources: its listeners and route tables (pure).

The proxy names its Gateway (``node.metadata.gateway``, in its namespace); a Gateway the
mesh does not have, or one with no served listener, gives no listener (the proxy waits).
Clusters and endpoints are not here: the gateway shares the sidecars' layers for the
services it sees (``assembly/gateway.py``)."""

from __future__ import annotations

from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf.message import Message

from controlplane import resource
from controlplane.mesh.gateway_attach import (
    HTTP,
    HTTPS,
    TCP,
    ServedListener,
    gateway_attachments,
)
from controlplane.mesh.model import Mesh
from controlplane.proxy import ProxyIdentity
from controlplane.translator.gateway import names
from controlplane.translator.gateway.listeners import (
    http_listener,
    tcp_listener,
    tls_listener,
)
from controlplane.translator.gateway.routes import route_table


def gateway_resources(mesh: Mesh, proxy: ProxyIdentity) -> dict[str, list[Message]]:
    """{LISTENER: [...], ROUTE: [...]}, each sorted by name."""
    view = gateway_attachments(mesh).gateway(proxy.namespace, proxy.gateway)
    listeners: list[listener_pb2.Listener] = []
    tables: list[route_pb2.RouteConfiguration] = []
    ports: dict[int, list[ServedListener]] = {}
    for served in view.served if view is not None else ():
        ports.setdefault(served.listener.port, []).append(served)
    for port, served_here in ports.items():
        if served_here[0].listener.protocol == HTTP:
            listeners.append(http_listener(proxy, port))
            tables.append(route_table(mesh, names.route(port), served_here))
            continue
        if served_here[0].listener.protocol == TCP:
            tcp = tcp_listener(mesh, proxy, port, served_here[0])
            listeners.extend([tcp] if tcp is not None else [])
            continue
        made = tls_listener(mesh, proxy, port, served_here)
        if made is None:
            continue
        listeners.append(made)
        for served in served_here:
            if served.listener.protocol == HTTPS:
                tables.append(route_table(mesh, names.route(port, served.listener.name),
                                          [served]))
    return {resource.LISTENER: sorted(listeners, key=lambda m: str(m.name)),
            resource.ROUTE: sorted(tables, key=lambda m: str(m.name))}
