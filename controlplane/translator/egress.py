"""TCP and TLS to services outside the mesh (``external_name``), through the sidecar.

An external service has no address of its own to match, so its ``tcp`` and ``tls`` ports
are told apart by what the connection says:

- ``tls``: by the server name (SNI) of the app's own ClientHello, read by Envoy's
  tls_inspector on those ports only; the TLS passes through untouched (the sidecar has
  no key) to the service's DNS cluster. Several external hosts share 443 this way.
- ``tcp``: by port alone (a database speaks first, or wraps TLS in its own protocol:
  nothing to read), so a port belongs to one external host. Two external services with
  different hosts on one ``tcp`` port cannot be told apart: neither is routed on it (see
  ``ExternalPorts.shared``), and calls there go where the app's own resolution sent them
  (ALLOW_ANY) or are refused (REGISTRY_ONLY).

Captured sidecars get these as chains of the egress listener, matched when no address
matches (a mesh service's cluster IP on the same port wins). A sidecar that is not
captured gets a listener per such port on 127.0.0.1 (``loopback_listeners``): the app
connects to 127.0.0.1:PORT (keeping the server name for TLS), as with Istio's explicit
egress listeners. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.type.v3 import range_pb2

from controlplane.mesh.model import Service, ServicePort
from controlplane.proxy import ProxyIdentity
from controlplane.translator import names
from controlplane.translator.listeners import EGRESS_ADDRESS, NO_REUSE_PORT, tcp_chain
from controlplane.translator.protoutil import pack, socket_address

TLS_INSPECTOR: Final = "envoy.filters.listener.tls_inspector"

_Chain: TypeAlias = listener_components_pb2.FilterChain
_ListenerFilter: TypeAlias = listener_components_pb2.ListenerFilter
_Predicate: TypeAlias = listener_components_pb2.ListenerFilterChainMatchPredicate


@dataclass(frozen=True, slots=True)
class ExternalPort:
    """One ``tcp`` or ``tls`` port of an external service."""

    service: Service
    port: ServicePort

    @property
    def host(self) -> str:
        return self.service.external_name or ""

    @property
    def cluster(self) -> str:
        return names.outbound_cluster(self.service, self.port.port)


@dataclass(frozen=True, slots=True)
class ExternalPorts:
    """The routable external TCP/TLS ports of a set of services, by port number."""

    tls: dict[int, list[ExternalPort]] = field(default_factory=dict)  # one per host
    tcp: dict[int, ExternalPort] = field(default_factory=dict)
    shared: dict[int, list[str]] = field(default_factory=dict)  # port -> service keys

    @property
    def opaque(self) -> set[int]:
        """Ports where no HTTP may be sniffed: a server-first protocol must not wait."""
        return {*self.tcp, *self.shared}


def external_ports(services: Iterable[Service]) -> ExternalPorts:
    """Services by key; a (host, port) is routed once (two names for one host go to the
    first one's cluster). A port with a ``tcp`` entry and more than one host is
    ``shared``: routed to none of them."""
    by_port: dict[int, dict[str, ExternalPort]] = {}
    for service in sorted((s for s in services if s.external_name is not None),
                          key=lambda s: s.key):
        for port in service.service_ports:
            if port.protocol in ("tcp", "tls"):
                found = ExternalPort(service, port)
                by_port.setdefault(port.port, {}).setdefault(found.host, found)
    made = ExternalPorts()
    for number, hosts in sorted(by_port.items()):
        entries = list(hosts.values())
        if len(entries) == 1 and entries[0].port.protocol == "tcp":
            made.tcp[number] = entries[0]
        elif any(e.port.protocol == "tcp" for e in entries):
            made.shared[number] = [e.service.key for e in entries]
        else:
            made.tls[number] = entries
    return made


def sni_chains(found: ExternalPorts) -> list[_Chain]:
    """A chain per external TLS host and port, matched by its server name."""
    return [_chain(entry, port, sni=True) for port, entries in sorted(found.tls.items())
            for entry in entries]


def port_chains(found: ExternalPorts) -> list[_Chain]:
    """A chain per external TCP port, matched by the port alone."""
    return [_chain(entry, port, sni=False) for port, entry in sorted(found.tcp.items())]


def tls_inspector(found: ExternalPorts) -> list[_ListenerFilter]:
    """Envoy's tls_inspector, on the external TLS ports only (elsewhere a client that
    waits for the server would wait for it in vain)."""
    if not found.tls:
        return []
    inspector = _ListenerFilter(name=TLS_INSPECTOR,
                                typed_config=pack(tls_inspector_pb2.TlsInspector()))
    inspector.filter_disabled.CopyFrom(_Predicate(not_match=on_ports(sorted(found.tls))))
    return [inspector]


def loopback_listeners(services: Iterable[Service],
                       proxy: ProxyIdentity) -> list[listener_pb2.Listener]:
    """A sidecar that is not captured: a listener on 127.0.0.1 per external TCP/TLS
    port (``egress~PORT``), by SNI or to its one host. None on a port the sidecar
    already uses (its egress, inbound and app ports); none for on-demand sidecars
    (their clusters come on a first HTTP call, which TCP never makes)."""
    if proxy.capture or proxy.on_demand:
        return []
    found = external_ports(services)
    taken = {proxy.egress_port, proxy.inbound_port, proxy.app_port}
    made = []
    for port in sorted({*found.tls, *found.tcp} - taken):
        if port in found.tls:
            chains = [_chain(entry, port, sni=True, matched=False) for entry in found.tls[port]]
            filters = [_ListenerFilter(name=TLS_INSPECTOR,
                                       typed_config=pack(tls_inspector_pb2.TlsInspector()))]
        else:
            chains, filters = [_chain(found.tcp[port], port, sni=False, matched=False)], []
        made.append(listener_pb2.Listener(
            name=listener_name(port), address=socket_address(EGRESS_ADDRESS, port),
            traffic_direction=base_pb2.TrafficDirection.OUTBOUND,
            listener_filters=filters, filter_chains=chains, enable_reuse_port=NO_REUSE_PORT))
    return made


def listener_name(port: int) -> str:
    return f"{names.EGRESS_LISTENER}~{port}"


def on_ports(ports: list[int]) -> _Predicate:
    """A predicate true for connections to any of ``ports``."""
    rules = [_Predicate(destination_port_range=range_pb2.Int32Range(start=p, end=p + 1))
             for p in ports]
    return rules[0] if len(rules) == 1 else _Predicate(or_match=_Predicate.MatchSet(rules=rules))


def _chain(entry: ExternalPort, port: int, sni: bool, matched: bool = True) -> _Chain:
    """To the entry's cluster; ``matched``: on the captured listener, by destination port
    (and server name); on a loopback listener only by server name (the port is its own)."""
    cluster = entry.cluster
    made = tcp_chain(f"{cluster}~sni" if sni else cluster, cluster, stat_prefix=cluster,
                     idle_timeout=entry.service.policy.idle_timeout)
    if matched:
        made.filter_chain_match.destination_port.value = port
    if sni:
        made.filter_chain_match.server_names.append(entry.host)
    return made
