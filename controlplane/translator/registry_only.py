"""``outbound_traffic_policy: REGISTRY_ONLY`` on a captured sidecar's egress listener:
only the mesh's destinations are reached; the rest is refused in a way that says why.

What the egress listener gains (capture.py builds the rest):
- HTTP to an unknown destination gets a 502 whose body says what to do. Envoy's
  http_inspector tells HTTP apart (not on TCP service ports: a server-first protocol
  there must not wait for a sniff), and since Envoy never falls back from a
  destination port's chains to port-less ones, there is one such chain per port that
  has chains, and one for every other port.
- A service with ``external_name`` has no address to match, so it is matched by what
  the call says: HTTP by Host (its port's refusal chain routes the service's names and
  the external host to its cluster before refusing the rest); its ``tls`` and ``tcp``
  ports have their chains in every mode (egress.py: by SNI, by port), and the inspector
  is off on the ``tcp`` ones too.
Anything else is closed (the default chain, to the black hole).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Final, TypeAlias

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message

from controlplane.mesh.model import Service
from controlplane.translator.egress import on_ports
from controlplane.translator.listeners import (
    HTTP_CONNECTION_MANAGER,
    chain,
    egress_manager,
    router,
)
from controlplane.translator.protoutil import pack
from controlplane.translator.routes import virtual_hosts

HTTP_INSPECTOR: Final = "envoy.filters.listener.http_inspector"
HTTP_PROTOCOLS: Final = ("http/1.0", "http/1.1", "h2c")  # what http_inspector reports
REFUSED: Final = "registry-only"
BODY: Final = (
    "controlplane: this destination is not a service of the mesh, and the mesh's "
    "outbound_traffic_policy is REGISTRY_ONLY. Add the service to the mesh (with its "
    "cluster_ips), or set outbound_traffic_policy: ALLOW_ANY.\n"
)

_Chain: TypeAlias = listener_components_pb2.FilterChain
_ListenerFilter: TypeAlias = listener_components_pb2.ListenerFilter
_HCM: TypeAlias = http_connection_manager_pb2.HttpConnectionManager


def registry_only(services: Iterable[Service], chain_ports: set[int],
                  tcp_ports: set[int]) -> tuple[list[_Chain], list[_ListenerFilter]]:
    """The chains and listener filters REGISTRY_ONLY adds, given the destination ports
    that have chains already and those where nothing may be sniffed (TCP services',
    and the external ``tcp`` ports: egress.py)."""
    external = sorted((s for s in services if s.external_name is not None),
                      key=lambda s: s.key)
    by_port = _external_hosts(external)
    ports: list[int | None] = [*sorted((chain_ports | by_port.keys()) - tcp_ports), None]
    refusals = [_refusal_chain(port, by_port.get(port, []) if port is not None else [])
                for port in ports]
    inspector = _filter(HTTP_INSPECTOR, http_inspector_pb2.HttpInspector())
    if tcp_ports:
        inspector.filter_disabled.CopyFrom(on_ports(sorted(tcp_ports)))
    return refusals, [inspector]


def _external_hosts(external: list[Service]) -> dict[int, list[route_components_pb2.VirtualHost]]:
    """Per port, the virtual hosts of the external services' HTTP ports: their names
    (the short one when unambiguous) and the external host, each domain once."""
    found: dict[int, list[route_components_pb2.VirtualHost]] = {}
    taken: set[str] = set()
    named = Counter(s.name for s in external)
    for service in external:
        routed = [p for p in service.service_ports if p.protocol in ("http", "grpc")]
        # The short name too, when no other external service has it: the listener is
        # the same in every namespace, so it cannot tell two apart.
        short = [service.name] if named[service.name] == 1 else []
        for index, (port, host) in enumerate(zip(routed, virtual_hosts(service, ""),
                                                 strict=True)):
            bare = [*short, service.external_name or ""] if index == 0 else []
            extra = [*bare, *(f"{h}:{port.port}" for h in [*short, service.external_name])]
            # Each domain once: an external host may be one of the service's own names
            # (``zzz.ns``), or its short name.
            own = set(host.domains)
            host.domains.extend(d for d in dict.fromkeys(extra)
                                if d and d not in taken and d not in own)
            taken.update(host.domains)
            found.setdefault(port.port, []).append(host)
    return found


def _refusal_chain(port: int | None, hosts: list[route_components_pb2.VirtualHost]) -> _Chain:
    """HTTP on ``port`` (None: any other): the external services' hosts, else a 502."""
    refuse = route_components_pb2.VirtualHost(name=REFUSED, domains=["*"], routes=[
        route_components_pb2.Route(
            match=route_components_pb2.RouteMatch(prefix="/"),
            direct_response=route_components_pb2.DirectResponseAction(
                status=502, body=base_pb2.DataSource(inline_string=BODY)))])
    table = route_pb2.RouteConfiguration(name=REFUSED, virtual_hosts=[*hosts, refuse])
    manager: _HCM
    if hosts:  # the egress filters (fault, rate limit...) for the services' routes
        manager = egress_manager()
        manager.ClearField("rds")
        manager.route_config.CopyFrom(table)
        manager.stat_prefix = "registry_only"
    else:
        manager = _HCM(stat_prefix="registry_only", codec_type=_HCM.CodecType.AUTO,
                       route_config=table, http_filters=[router()],
                       use_remote_address=wrappers_pb2.BoolValue(value=False))
    found = chain(HTTP_CONNECTION_MANAGER, manager)
    found.name = REFUSED if port is None else f"{REFUSED}~{port}"
    if port is not None:
        found.filter_chain_match.destination_port.value = port
    found.filter_chain_match.application_protocols.extend(HTTP_PROTOCOLS)
    return found


def _filter(name: str, config: Message) -> _ListenerFilter:
    return _ListenerFilter(name=name, typed_config=pack(config))
