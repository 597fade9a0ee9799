"""API listeners: what a gRPC client asks for when its target is ``xds:///NAME``.

The client subscribes to the listener named exactly NAME (``reviews``, ``reviews:9080``,
``reviews.default.svc.cluster.local:9080``...) and then picks the virtual host whose
domain is NAME in the route table that listener names. So the names served are the
domains of the gRPC route table: a name resolves exactly when the table routes it, with
the same scoping and the same bare-name rule (only for the client's own namespace) as a
sidecar's egress table. Every listener points at the one table, by RDS.
"""

from __future__ import annotations

from typing import Final

from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2

from controlplane.translator.policies.fault import FAULT_FILTER
from controlplane.translator.protoutil import ads, pack

GRPC_ROUTE: Final = "grpc-egress"  # the route table every API listener names
ROUTER: Final = "envoy.filters.http.router"


def listener_names(config: route_pb2.RouteConfiguration) -> list[str]:
    """Every name a client may dial: the table's domains, sorted."""
    return sorted({domain for host in config.virtual_hosts for domain in host.domains})


def api_listener(name: str) -> listener_pb2.Listener:
    """The fault filter (A33), which injects nothing unless a route turns it on, then
    the router, which gRPC demands last. Nothing else: gRPC reads only these."""
    return listener_pb2.Listener(
        name=name, api_listener=api_listener_pb2.ApiListener(api_listener=_MANAGER))


def _manager() -> any_pb2.Any:
    """The same for every name (a mesh of 1000 services has 8000 names): packed once."""
    return pack(hcm_pb2.HttpConnectionManager(
        rds=hcm_pb2.Rds(config_source=ads(), route_config_name=GRPC_ROUTE),
        http_filters=[
            hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=pack(fault_pb2.HTTPFault())),
            hcm_pb2.HttpFilter(name=ROUTER, typed_config=pack(router_pb2.Router())),
        ],
    ))


_MANAGER: Final = _manager()
