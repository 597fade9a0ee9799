"""A gateway's listeners: one per port its served Gateway listeners use.

- HTTP: one HTTP connection manager over the port's route table (RDS).
- HTTPS and TLS (one port may hold both: both are told apart by SNI): the TLS inspector
  reads the SNI; an HTTPS listener's chain matches its hostname (any, without one) and
  terminates TLS with its certificates, named by SDS and answered per stream to this
  gateway only (``cache/gateway_secrets.py``; with several, Envoy picks by SNI), then
  routes by its own route table; a TLSRoute's chain matches its hostnames and passes the
  bytes, still encrypted, to its backends. A TLS listener in mode Terminate does the
  same with its certificates (no ALPN offered: what follows is not HTTP) and forwards
  the decrypted bytes: a TLSRoute's chain per its hostnames, a TCPRoute's for the
  listener's hostname.
- TCP: one TCP proxy to the first TCPRoute's backends (a TCP stream has nothing to route
  by but its port).
The connection manager is the edge's: the client's address is the remote address
(``use_remote_address``), and a Host's port is ignored when matching virtual hosts.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from google.protobuf import wrappers_pb2

from controlplane.mesh.gateway_attach import HTTPS, TLS, ServedListener, first_tcp_route
from controlplane.mesh.gateway_listeners import terminates
from controlplane.mesh.gateway_tcp import TCPRoute
from controlplane.mesh.gateways import TLSRoute
from controlplane.mesh.model import Mesh
from controlplane.proxy import ProxyIdentity
from controlplane.translator import names as mesh_names
from controlplane.translator.gateway import names
from controlplane.translator.listeners import (
    HTTP_CONNECTION_MANAGER,
    NO_REUSE_PORT,
    TCP_PROXY,
    chain,
    router,
)
from controlplane.translator.policies import FEATURES
from controlplane.translator.protoutil import ads, pack, socket_address, u32

_HCM = http_connection_manager_pb2.HttpConnectionManager
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
DOWNSTREAM_TLS = "envoy.transport_sockets.tls"


def manager(port: int, table: str) -> http_connection_manager_pb2.HttpConnectionManager:
    """The governance features' filters (each off until a route turns it on), then the
    router, over the route table ``table``."""
    return _HCM(
        stat_prefix=f"gateway_{port}",
        codec_type=_HCM.CodecType.AUTO,
        rds=http_connection_manager_pb2.Rds(config_source=ads(), route_config_name=table),
        http_filters=[*(f for feature in FEATURES for f in feature.http_filters()), router()],
        use_remote_address=wrappers_pb2.BoolValue(value=True),
        strip_any_host_port=True,
    )


def http_listener(proxy: ProxyIdentity, port: int) -> listener_pb2.Listener:
    return _listener(proxy, port, [chain(HTTP_CONNECTION_MANAGER,
                                         manager(port, names.route(port)))])


def tls_listener(mesh: Mesh, proxy: ProxyIdentity, port: int,
                 served: Sequence[ServedListener]) -> listener_pb2.Listener | None:
    """The chains of the port's HTTPS and TLS listeners; None when none has a chain (a
    TLS listener no TLSRoute reaches). Chains are matched by SNI: a name already taken
    by an earlier listener or route of the port is not claimed twice (Envoy refuses
    two chains with the same match)."""
    chains: list[listener_components_pb2.FilterChain] = []
    taken: set[str] = set()
    for entry in served:
        listener = entry.listener
        if listener.protocol == HTTPS:
            sni = _claim([listener.hostname] if listener.hostname else [], taken)
            if sni is None:
                continue
            made = chain(HTTP_CONNECTION_MANAGER,
                         manager(port, names.route(port, listener.name)))
            made.name = f"https/{listener.name}"
            made.filter_chain_match.server_names.extend(sni)
            made.transport_socket.CopyFrom(terminate(entry.certificates))
            chains.append(made)
        elif listener.protocol == TLS:
            decrypt = terminates(listener)
            first_tcp = first_tcp_route(entry)
            for attached in entry.routes:
                route = attached.route
                if not (isinstance(route, TLSRoute) or (decrypt and route is first_tcp)):
                    continue
                assert isinstance(route, TLSRoute | TCPRoute)
                hosts = [h for h in attached.hostnames if h != "*"]
                proxy_config = passthrough(mesh, route, listener.name)
                sni = _claim(hosts, taken) if proxy_config is not None else None
                if sni is None or proxy_config is None:
                    continue
                made = chain(TCP_PROXY, proxy_config)
                made.name = (f"{'tls-terminate' if decrypt else 'tls'}/{listener.name}/"
                             f"{route.namespace}/{route.name}")
                made.filter_chain_match.server_names.extend(sni)
                if decrypt:
                    made.transport_socket.CopyFrom(terminate(entry.certificates, alpn=()))
                chains.append(made)
    if not chains:
        return None
    made_listener = _listener(proxy, port, chains)
    made_listener.listener_filters.append(listener_components_pb2.ListenerFilter(
        name=TLS_INSPECTOR, typed_config=pack(tls_inspector_pb2.TlsInspector())))
    return made_listener


def terminate(certificates: Sequence[tuple[str, str]],
              alpn: Sequence[str] = ("h2", "http/1.1")) -> base_pb2.TransportSocket:
    """TLS terminated with the listener's certificates, fetched by SDS (HTTPS: HTTP/2
    and HTTP/1.1 offered by ALPN; a TLS listener's stream: none)."""
    context = tls_pb2.DownstreamTlsContext(common_tls_context=tls_pb2.CommonTlsContext(
        alpn_protocols=list(alpn),
        tls_certificate_sds_secret_configs=[
            secret_pb2.SdsSecretConfig(name=names.certificate_secret(ns, name),
                                       sds_config=ads())
            for ns, name in certificates]))
    return base_pb2.TransportSocket(name=DOWNSTREAM_TLS, typed_config=pack(context))


def tcp_listener(mesh: Mesh, proxy: ProxyIdentity, port: int,
                 served: ServedListener) -> listener_pb2.Listener | None:
    """A TCP listener: every connection to its first TCPRoute's backends; None when no
    TCPRoute is attached or none of its backends resolves."""
    route = first_tcp_route(served)
    config = passthrough(mesh, route, served.listener.name) if route is not None else None
    if route is None or config is None:
        return None
    made = chain(TCP_PROXY, config)
    made.name = f"tcp/{served.listener.name}/{route.namespace}/{route.name}"
    return _listener(proxy, port, [made])


def passthrough(mesh: Mesh, route: TLSRoute | TCPRoute, section: str
                ) -> tcp_proxy_pb2.TcpProxy | None:
    """A TCP proxy to the route's backends (weighted); None when none resolves."""
    legs: list[tuple[str, int]] = []
    for rule in route.rules:
        for ref in rule.backend_refs:
            service = mesh.service(ref.name, ref.namespace or route.namespace)
            if (ref.group != "" or ref.kind != "Service" or service is None
                    or ref.port is None or ref.weight == 0
                    or ref.port not in {p.port for p in service.service_ports}):
                continue
            if (ref.namespace or route.namespace) != route.namespace and not any(
                    g.namespace == ref.namespace and g.allows(
                        route.key[0], route.namespace, "Service", ref.name)
                    for g in mesh.reference_grants):
                continue
            legs.append((mesh_names.outbound_cluster(service, ref.port), ref.weight))
    if not legs:
        return None
    stat = f"gateway_{section}_{route.namespace}_{route.name}"
    if len(legs) == 1:
        return tcp_proxy_pb2.TcpProxy(stat_prefix=stat, cluster=legs[0][0])
    return tcp_proxy_pb2.TcpProxy(stat_prefix=stat, weighted_clusters=(
        tcp_proxy_pb2.TcpProxy.WeightedCluster(clusters=[
            tcp_proxy_pb2.TcpProxy.WeightedCluster.ClusterWeight(name=c, weight=w)
            for c, w in legs])))


def _claim(names_: Sequence[str], taken: set[str]) -> list[str] | None:
    """The SNI names still free (all of them: [] is the no-SNI default chain)."""
    if not names_:
        if "" in taken:
            return None
        taken.add("")
        return []
    free = [n for n in dict.fromkeys(names_) if n not in taken]
    taken.update(free)
    return free or None


def _listener(proxy: ProxyIdentity, port: int,
              chains: list[listener_components_pb2.FilterChain]) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=names.listener(port),
        address=socket_address(proxy.inbound_address, port),
        traffic_direction=base_pb2.TrafficDirection.INBOUND,
        filter_chains=chains,
        enable_reuse_port=NO_REUSE_PORT,
        per_connection_buffer_limit_bytes=u32(32 * 1024),
    )
