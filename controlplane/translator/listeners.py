"""Listeners: the egress listener every sidecar has, and the optional inbound one."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Final

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import wrappers_pb2

from controlplane.mesh.model import Service
from controlplane.proxy import ProxyIdentity
from controlplane.translator import names
from controlplane.translator.clusters import inbound_service_port
from controlplane.translator.ondemand import on_demand_filter
from controlplane.translator.policies import FEATURES
from controlplane.translator.protoutil import ads, duration, pack, socket_address
from controlplane.translator.routes import inbound_route
from controlplane.translator.security import (
    Inbound,
    Port,
    inbound_http_filters,
    secure_chains,
    secure_listener,
    secure_manager,
    secure_tcp_chain,
)

HTTP_CONNECTION_MANAGER: Final = "envoy.filters.network.http_connection_manager"
TCP_PROXY: Final = "envoy.filters.network.tcp_proxy"
ROUTER: Final = "envoy.filters.http.router"
EGRESS_ADDRESS: Final = "127.0.0.1"
IDLE_TIMEOUT: Final = timedelta(hours=1)  # a captured TCP connection with no bytes either way

_HCM = http_connection_manager_pb2.HttpConnectionManager
# Envoy sets SO_REUSEPORT by default: a second sidecar given a port another one holds
# would bind it too and silently take half its connections. Off, it fails to bind, and
# says so.
NO_REUSE_PORT = wrappers_pb2.BoolValue(value=False)


def egress_listener(proxy: ProxyIdentity) -> listener_pb2.Listener:
    """On loopback only: the app calls out through it, nobody else should. Routes come
    by RDS, so a new service changes the route table, not the listener (which Envoy
    would drain and rebuild). An on-demand sidecar's has the on-demand filter just
    before the router: it fetches the virtual host and cluster a call needs."""
    return listener_pb2.Listener(
        name=names.EGRESS_LISTENER,
        address=socket_address(EGRESS_ADDRESS, proxy.egress_port),
        traffic_direction=base_pb2.TrafficDirection.OUTBOUND,
        filter_chains=[chain(HTTP_CONNECTION_MANAGER, egress_manager(proxy.on_demand))],
        enable_reuse_port=NO_REUSE_PORT,
    )


def egress_manager(on_demand: bool = False) -> http_connection_manager_pb2.HttpConnectionManager:
    """The egress HTTP connection manager: the governance features' filters, then the
    router, over the ``egress`` route table (RDS). A captured sidecar's HTTP chains use
    the same one."""
    features = [f for feature in FEATURES for f in feature.http_filters()]
    if on_demand:
        features.append(on_demand_filter())
    return _HCM(
        stat_prefix="egress",
        codec_type=_HCM.CodecType.AUTO,
        rds=http_connection_manager_pb2.Rds(
            config_source=ads(), route_config_name=names.EGRESS_ROUTE
        ),
        http_filters=[*features, router()],
        use_remote_address=wrappers_pb2.BoolValue(value=False),
    )


def inbound_manager(cluster_name: str, filters: Sequence[http_connection_manager_pb2.HttpFilter]
                    = ()) -> http_connection_manager_pb2.HttpConnectionManager:
    """In front of the app: ``filters``, then everything to ``cluster_name``."""
    return _HCM(
        stat_prefix="inbound",
        codec_type=_HCM.CodecType.AUTO,
        route_config=inbound_route(cluster_name),
        http_filters=[*filters, router()],
        use_remote_address=wrappers_pb2.BoolValue(value=False),
    )


def inbound_listener(
    proxy: ProxyIdentity, own: Service | None, cluster_name: str,
    security: Inbound | None = None,
) -> listener_pb2.Listener | None:
    """In front of the proxy's own app. The route is inline: it only ever points at the
    one static cluster. A TCP service gets a plain TCP proxy. ``security``: the
    service's mTLS mode and authorization (translator/security)."""
    if proxy.inbound_port is None or proxy.app_port is None:
        return None
    port = None if own is None else Port(inbound_service_port(own, proxy.inbound_port),
                                         proxy.inbound_port)
    if port is not None and not port.http:
        only = chain(
            TCP_PROXY, tcp_proxy_pb2.TcpProxy(stat_prefix="inbound", cluster=cluster_name)
        )
        secure_tcp_chain(security, port, only)
    else:
        manager = inbound_manager(cluster_name, inbound_http_filters(security, port))
        secure_manager(security, port, manager)
        only = chain(HTTP_CONNECTION_MANAGER, manager)
    listener = listener_pb2.Listener(
        name=names.INBOUND_LISTENER,
        address=socket_address(proxy.inbound_address, proxy.inbound_port),
        traffic_direction=base_pb2.TrafficDirection.INBOUND,
        filter_chains=secure_chains(security, only),
        enable_reuse_port=NO_REUSE_PORT,
    )
    secure_listener(security, listener)
    return listener


def router() -> http_connection_manager_pb2.HttpFilter:
    return http_connection_manager_pb2.HttpFilter(
        name=ROUTER, typed_config=pack(router_pb2.Router())
    )


def chain(
    name: str, config: http_connection_manager_pb2.HttpConnectionManager | tcp_proxy_pb2.TcpProxy
) -> listener_components_pb2.FilterChain:
    return listener_components_pb2.FilterChain(
        filters=[listener_components_pb2.Filter(name=name, typed_config=pack(config))]
    )


def tcp_chain(name: str, cluster: str, stat_prefix: str | None = None,
              idle_timeout: timedelta | None = None) -> listener_components_pb2.FilterChain:
    """A named chain that proxies TCP to ``cluster``, closed after ``idle_timeout``
    without a byte either way (``IDLE_TIMEOUT`` when None; 0s: never, as in Envoy)."""
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix or name, cluster=cluster,
                                   idle_timeout=duration(idle_timeout if idle_timeout
                                                         is not None else IDLE_TIMEOUT))
    made = chain(TCP_PROXY, proxy)
    made.name = name
    return made
