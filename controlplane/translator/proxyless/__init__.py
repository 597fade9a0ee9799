"""Resources for proxyless gRPC clients (``xds:///NAME`` targets): what a gRPC library's
own xDS client reads, derived from the sidecars' resources.

A gRPC client is not Envoy: it reads a subset of each resource (gRFCs A27, A28, A31,
A33, A42, A44, A50) and NACKs a whole response when a field it reads holds a value it
does not support. So each resource is rebuilt here from a whitelist: what gRPC supports
is kept or translated, everything else is left out and noted (``LeftOut``), so that an
Envoy-only feature of one service never breaks the table for every service.

- ``listeners``: one API listener per name a client may dial (the route table's domains);
- ``routes``: the egress route table, translated;
- ``clusters``: EDS clusters with the LB policies gRPC knows;
- ``endpoints``: load assignments with locality weights (gRPC drops unweighted ones);
- ``server_listeners``, ``server_rbac``: for gRPC servers (``grpc.server(xds=True)``,
  gRFC A36): a Listener per address a pod of the service may listen on, with the
  service's mTLS mode and authorization rules as gRPC reads them (A29, A41).
"""

from controlplane.translator.proxyless.clusters import grpc_cluster, placeholder_cluster
from controlplane.translator.proxyless.endpoints import grpc_assignment
from controlplane.translator.proxyless.listeners import GRPC_ROUTE, api_listener, listener_names
from controlplane.translator.proxyless.notes import LeftOut
from controlplane.translator.proxyless.retries import grpc_retry_on
from controlplane.translator.proxyless.routes import GrpcRoutes, grpc_route_config
from controlplane.translator.proxyless.server_listeners import server_listeners

__all__ = [
    "GRPC_ROUTE",
    "GrpcRoutes",
    "LeftOut",
    "api_listener",
    "grpc_assignment",
    "grpc_cluster",
    "grpc_retry_on",
    "grpc_route_config",
    "listener_names",
    "placeholder_cluster",
    "server_listeners",
]
