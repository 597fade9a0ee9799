"""A captured sidecar's listeners and clusters: it follows each connection's original
destination, as Istio's virtualOutbound and virtualInbound listeners do.

``controlplane capture`` (iptables) sends every outbound TCP connection of the pod to
15001 and every inbound one to 15006; the ``original_dst`` listener filter restores the
address the connection was for, and the filter chain whose destination port and prefix
match it takes the connection:

- egress, on 0.0.0.0:15001: chains matching the services' cluster IPs and ports (a
  headless service: its endpoints' addresses, up to ``MAX_HEADLESS_ADDRESSES`` per
  port); HTTP and gRPC (one chain per port) through the ``egress`` route table (by
  Host, every policy applied), TCP (one chain per service port) through a TCP proxy to
  the service's cluster (a headless one: to the pod the caller dialled), closed when idle
  for the service's ``policy.idle_timeout`` (default 1h). An app that calls
  127.0.0.1:15001 with a Host header still gets the route table. Anything else: the
  original destination (``ALLOW_ANY``), or, with ``REGISTRY_ONLY`` (registry_only.py),
  a 502 saying why for HTTP and a closed connection for the rest. Services outside the
  mesh (``external_name``) have no address: their ``tls`` ports are matched by server
  name, their ``tcp`` ports by port alone (egress.py), in both modes.
- inbound, on 0.0.0.0:15006: a chain per target port of the sidecar's own service
  (HTTP through an HTTP connection manager, so inbound HTTP filters apply), other ports
  passed through; a connection for 15006 itself is closed (it would loop). Its HTTP
  chains carry the features' inbound filters (the rate limit: each pod its own bucket).

The egress listener depends on the services a sidecar sees and its port only, so the
assembly builds it once per (visible set, egress port). Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final, TypeAlias

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from google.protobuf import wrappers_pb2

from controlplane.mesh.model import OutboundTrafficPolicy, Service, ServicePort
from controlplane.proxy import ProxyIdentity
from controlplane.translator import names
from controlplane.translator.clusters import CONNECT_TIMEOUT, use_http2
from controlplane.translator.egress import external_ports, port_chains, sni_chains, tls_inspector
from controlplane.translator.listeners import (
    HTTP_CONNECTION_MANAGER,
    NO_REUSE_PORT,
    chain,
    egress_manager,
    inbound_manager,
    tcp_chain,
)
from controlplane.translator.policies import FEATURES
from controlplane.translator.protoutil import duration, pack, socket_address
from controlplane.translator.registry_only import registry_only
from controlplane.translator.security import (
    Inbound,
    Port,
    inbound_http_filters,
    secure_chains,
    secure_listener,
    secure_manager,
    secure_tcp_chain,
)

ORIGINAL_DST: Final = "envoy.filters.listener.original_dst"
ANY_ADDRESS: Final = "0.0.0.0"
LOOPBACK: Final = "127.0.0.1"
# The inbound side connects to the app from this address: capture leaves connections
# from it alone (``-s 127.0.0.6/32 -o lo -j RETURN``), where the proxy's own connection
# to its pod's IP over lo would otherwise be sent back to 15006 (Istio's address).
INBOUND_SOURCE: Final = "127.0.0.6"
MAX_HEADLESS_ADDRESSES: Final = 256  # per headless service port: the rest pass through

_Chain: TypeAlias = listener_components_pb2.FilterChain
_Match: TypeAlias = listener_components_pb2.FilterChainMatch
_Cluster: TypeAlias = cluster_pb2.Cluster


# -- egress --------------------------------------------------------------------------


def captured_egress_listener(services: Iterable[Service], egress_port: int,
                             policy: OutboundTrafficPolicy) -> listener_pb2.Listener:
    """The egress listener of every captured sidecar that sees ``services``."""
    services = list(services)
    chains, tcp_ports = _service_chains(services, egress_port)
    external = external_ports(services)  # TLS by SNI, TCP by port (egress.py)
    outside = [*sni_chains(external), *port_chains(external)]
    filters = [_original_dst_filter()]
    if policy == "REGISTRY_ONLY":
        ports = {c.filter_chain_match.destination_port.value for c in chains}
        more, inspectors = registry_only(services, ports, tcp_ports | external.opaque)
        chains += more
        filters += inspectors
        default = tcp_chain(names.BLACKHOLE_CLUSTER, names.BLACKHOLE_CLUSTER)
    else:
        default = tcp_chain(names.PASSTHROUGH_CLUSTER, names.PASSTHROUGH_CLUSTER)
    chains += outside
    filters += tls_inspector(external)
    return listener_pb2.Listener(
        name=names.EGRESS_LISTENER,
        address=socket_address(ANY_ADDRESS, egress_port),
        traffic_direction=base_pb2.TrafficDirection.OUTBOUND,
        listener_filters=filters,
        filter_chains=chains,
        default_filter_chain=default,
        enable_reuse_port=NO_REUSE_PORT,
    )


def _service_chains(services: Iterable[Service],
                    egress_port: int) -> tuple[list[_Chain], set[int]]:
    """The explicit chain (127.0.0.1:egress port, by Host header); one HTTP chain per
    destination port, over every HTTP/gRPC service's addresses on it (they share the
    route table, which routes by Host: one chain keeps a 1,000-service listener small);
    one TCP chain per TCP service port. Also the destination ports of TCP chains.
    Services by key; cluster IPs before headless addresses; an (address, port) is taken
    by the first service that claims it (Envoy refuses two chains with one match)."""
    explicit = _named(chain(HTTP_CONNECTION_MANAGER, egress_manager()), names.EGRESS_LISTENER)
    explicit.filter_chain_match.CopyFrom(_match(egress_port, [LOOPBACK]))
    claimed = {(LOOPBACK, egress_port)}
    http: dict[int, list[str]] = {}
    tcp: list[_Chain] = []
    ordered = sorted(services, key=lambda s: s.key)
    targets = [*((s, p, p.port, s.cluster_ips) for s in ordered if s.cluster_ips
                 for p in s.service_ports),
               *((s, p, d, ips) for s in ordered if s.headless
                 for p in s.service_ports for d, ips in _headless(s, p))]
    for service, port, destination, addresses in targets:
        free = [ip for ip in addresses if (ip, destination) not in claimed]
        if not free:
            continue
        claimed.update((ip, destination) for ip in free)
        if port.protocol != "tcp":
            http.setdefault(destination, []).extend(free)
            continue
        cluster = names.outbound_cluster(service, port.port)
        # A headless service's caller chose its pod (a StatefulSet member, say): the
        # connection goes to that address, not to a balanced pick.
        upstream = names.PASSTHROUGH_CLUSTER if service.headless else cluster
        name = cluster if destination == port.port else f"{cluster}~{destination}"
        made = tcp_chain(name, upstream, stat_prefix=cluster,
                         idle_timeout=service.policy.idle_timeout)
        made.filter_chain_match.CopyFrom(_match(destination, free))
        tcp.append(made)
    chains = [explicit]
    for destination, addresses in sorted(http.items()):
        made = _named(chain(HTTP_CONNECTION_MANAGER, egress_manager()), f"http~{destination}")
        made.filter_chain_match.CopyFrom(_match(destination, sorted(addresses, key=_ip_order)))
        chains.append(made)
    return [*chains, *tcp], {c.filter_chain_match.destination_port.value for c in tcp}


def _headless(service: Service, port: ServicePort) -> list[tuple[int, list[str]]]:
    """(target port, endpoint addresses) of a headless service's port: where its
    callers connect. Every endpoint, ready or not (readiness flaps must not change the
    listener), loopback left out (never captured), at most MAX_HEADLESS_ADDRESSES."""
    by_target: dict[int, set[str]] = {}
    for endpoint in service.endpoints:
        target = endpoint.port_for(port)
        if target is not None and not ipaddress.ip_address(endpoint.address).is_loopback:
            by_target.setdefault(target, set()).add(endpoint.address)
    return [(target, sorted(found, key=_ip_order)[:MAX_HEADLESS_ADDRESSES])
            for target, found in sorted(by_target.items())]


def headless_targets(service: Service) -> tuple[tuple[int, int, tuple[str, ...]], ...]:
    """What a captured listener's chains hold of ``service``'s endpoints: (port, target
    port, addresses) of a headless service, nothing for another."""
    if not service.headless:
        return ()
    return tuple((port.port, target, tuple(found)) for port in service.service_ports
                 for target, found in _headless(service, port))


# -- inbound -------------------------------------------------------------------------


def captured_inbound_listener(proxy: ProxyIdentity, own: Service | None,
                              security: Inbound | None = None) -> listener_pb2.Listener | None:
    """In front of the pod's apps: a chain per target port of the sidecar's own
    service, the rest passed through to where it was going. ``security``: the
    service's mTLS mode and authorization, per target port (translator/security)."""
    if not proxy.capture or proxy.inbound_port is None:
        return None
    loop = tcp_chain("inbound-loop", names.BLACKHOLE_CLUSTER)
    loop.filter_chain_match.destination_port.value = proxy.inbound_port
    chains = [loop]
    refuse = tcp_chain(names.BLACKHOLE_CLUSTER, names.BLACKHOLE_CLUSTER)
    if own is not None:
        chains += [made for target, port in _inbound_ports(own) if target != proxy.inbound_port
                   for made in secure_chains(
                       security, _inbound_chain(proxy, own, target, port, security), refuse)]
    listener = listener_pb2.Listener(
        name=names.INBOUND_LISTENER,
        address=socket_address(proxy.inbound_address, proxy.inbound_port),
        traffic_direction=base_pb2.TrafficDirection.INBOUND,
        listener_filters=[_original_dst_filter()],
        filter_chains=chains,
        default_filter_chain=tcp_chain(names.INBOUND_PASSTHROUGH_CLUSTER,
                                        names.INBOUND_PASSTHROUGH_CLUSTER),
        enable_reuse_port=NO_REUSE_PORT,
    )
    secure_listener(security, listener)
    return listener


def _inbound_chain(proxy: ProxyIdentity, own: Service, target: int,
                   port: ServicePort, security: Inbound | None) -> _Chain:
    """Connections for ``target``: HTTP through authorization and the features' inbound
    filters, TCP through authorization."""
    cluster = _inbound_name(proxy, target)
    at = Port(port, target)
    if port.protocol == "tcp":
        made = tcp_chain(cluster, cluster)
        secure_tcp_chain(security, at, made)
    else:
        filters = [*inbound_http_filters(security, at),
                   *(f for feature in FEATURES for f in feature.inbound_http_filters(own, port))]
        manager = inbound_manager(cluster, filters)
        secure_manager(security, at, manager)
        made = _named(chain(HTTP_CONNECTION_MANAGER, manager), cluster)
    made.filter_chain_match.destination_port.value = target
    return made


def _inbound_ports(own: Service) -> list[tuple[int, ServicePort]]:
    """(target port, service port) of the sidecar's own service: the ports its
    endpoints serve each service port on (the service port itself when no endpoint
    says), first port first when two share a target."""
    found: dict[int, ServicePort] = {}
    for port in own.service_ports:
        targets = {t for e in own.endpoints if (t := e.port_for(port)) is not None}
        for target in sorted(targets or {port.port}):
            found.setdefault(target, port)
    return sorted(found.items())


# -- clusters ------------------------------------------------------------------------


def capture_clusters(proxy: ProxyIdentity, own: Service | None) -> list[_Cluster]:
    """The clusters a captured sidecar's listeners use beside the services': the
    original destination (out and in), the black hole, and one per inbound port."""
    if not proxy.capture:
        return []
    clusters = [
        _original_dst(names.PASSTHROUGH_CLUSTER),
        _Cluster(name=names.BLACKHOLE_CLUSTER, type=_Cluster.DiscoveryType.STATIC,
                 connect_timeout=duration(CONNECT_TIMEOUT)),
        _original_dst(names.INBOUND_PASSTHROUGH_CLUSTER, INBOUND_SOURCE),
    ]
    for target, port in _inbound_ports(own) if own is not None else []:
        if target == proxy.inbound_port:
            continue
        cluster = _original_dst(_inbound_name(proxy, target), INBOUND_SOURCE)
        if port.protocol == "grpc":
            use_http2(cluster)
        clusters.append(cluster)
    return clusters


def _original_dst(name: str, source: str | None = None) -> _Cluster:
    cluster = _Cluster(name=name, type=_Cluster.DiscoveryType.ORIGINAL_DST,
                       lb_policy=_Cluster.LbPolicy.CLUSTER_PROVIDED,
                       connect_timeout=duration(CONNECT_TIMEOUT))
    if source is not None:
        cluster.upstream_bind_config.CopyFrom(address_pb2.BindConfig(
            source_address=address_pb2.SocketAddress(address=source, port_value=0)))
    return cluster


def _inbound_name(proxy: ProxyIdentity, port: int) -> str:
    return names.inbound_cluster(proxy.service, proxy.namespace, port)


# -- helpers -------------------------------------------------------------------------


def _named(found: _Chain, name: str) -> _Chain:
    found.name = name
    return found


def _match(port: int, addresses: Iterable[str]) -> _Match:
    return _Match(destination_port=wrappers_pb2.UInt32Value(value=port), prefix_ranges=[
        address_pb2.CidrRange(address_prefix=ip,
                              prefix_len=wrappers_pb2.UInt32Value(value=128 if ":" in ip else 32))
        for ip in addresses])


def _original_dst_filter() -> listener_components_pb2.ListenerFilter:
    """Restores the address a redirected connection was for: chains match on it."""
    return listener_components_pb2.ListenerFilter(
        name=ORIGINAL_DST, typed_config=pack(original_dst_pb2.OriginalDst()))


def _ip_order(ip: str) -> tuple[int, int]:
    parsed = ipaddress.ip_address(ip)
    return parsed.version, int(parsed)
