"""Sidecar telemetry (issue 12): the JSON access log and tracing, one module each.

``observed`` reads what applies to a sidecar from the mesh (mesh/telemetry.py);
``observe_listener`` adds it to every HTTP connection manager and TCP proxy of a listener
once the listener is built, so the builders (listeners.py, capture.py, registry_only.py)
stay as they are; ``telemetry_clusters`` is the collector's cluster when tracing is on.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2

from controlplane.mesh.model import Mesh, Service
from controlplane.mesh.telemetry import Tracing, effective
from controlplane.proxy import ProxyIdentity
from controlplane.translator.protoutil import pack
from controlplane.translator.telemetry.access_log import (
    HTTP_KEYS,
    METADATA_NAMESPACE,
    OWN_SERVICE,
    SOURCE_HEADER,
    Direction,
    access_log,
)
from controlplane.translator.telemetry.tracing import collector_cluster, manager_tracing

__all__ = [
    "HTTP_KEYS",
    "METADATA_NAMESPACE",
    "OWN_SERVICE",
    "SOURCE_HEADER",
    "Observed",
    "observe_listener",
    "observed",
    "telemetry_clusters",
]

HTTP_CONNECTION_MANAGER: Final = "envoy.filters.network.http_connection_manager"
TCP_PROXY: Final = "envoy.filters.network.tcp_proxy"


class Observed(NamedTuple):
    """What a sidecar records; hashable, since it keys the captured egress listeners
    sidecars of several services share."""

    access_log: bool = True
    tracing: Tracing | None = None
    service: str = ""
    """``name.namespace`` that spans carry; "" without tracing, so that sidecars of
    different services (that log alike) still share a listener."""


def observed(mesh: Mesh, own: Service | None, proxy: ProxyIdentity) -> Observed:
    found = effective(mesh, own, proxy.namespace)
    service = f"{proxy.service}.{proxy.namespace}" if found.tracing is not None else ""
    return Observed(found.access_log, found.tracing, service)


def telemetry_clusters(ctx: Observed) -> list[cluster_pb2.Cluster]:
    return [collector_cluster(ctx.tracing)] if ctx.tracing is not None else []


def observe_listener(ctx: Observed, listener: listener_pb2.Listener) -> None:
    """Add the access log (and tracing) to every chain of ``listener``, in place."""
    if not ctx.access_log and ctx.tracing is None:
        return
    direction: Direction = ("inbound" if listener.traffic_direction
                            == base_pb2.TrafficDirection.INBOUND else "outbound")
    done: dict[tuple[str, bytes], any_pb2.Any] = {}  # chains often hold equal filters
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        _observe_chain(ctx, direction, chain, done)


def _observe_chain(ctx: Observed, direction: Direction,
                   chain: listener_components_pb2.FilterChain,
                   done: dict[tuple[str, bytes], any_pb2.Any]) -> None:
    for found in chain.filters:
        if found.name not in (HTTP_CONNECTION_MANAGER, TCP_PROXY):
            continue
        key = (found.name, found.typed_config.value)
        made = done.get(key)
        if made is None:
            made = _observed_filter(ctx, direction, found.name, found.typed_config)
            done[key] = made
        found.typed_config.CopyFrom(made)


def _observed_filter(ctx: Observed, direction: Direction, name: str,
                     config: any_pb2.Any) -> any_pb2.Any:
    if name == HTTP_CONNECTION_MANAGER:
        manager = hcm_pb2.HttpConnectionManager()
        config.Unpack(manager)
        if ctx.access_log:
            manager.access_log.append(access_log(direction, http=True))
        if ctx.tracing is not None:
            manager.tracing.CopyFrom(manager_tracing(ctx.tracing, ctx.service))
        return pack(manager)
    proxy = tcp_proxy_pb2.TcpProxy()
    config.Unpack(proxy)
    if ctx.access_log:
        proxy.access_log.append(access_log(direction, http=False))
    return pack(proxy)
