"""xDS resource types: type URLs, the order ADS pushes them in, and which are full-state.

Kept apart from the cache and the server (go-control-plane's ``resource`` package), so
both can name types without depending on each other.
"""

from __future__ import annotations

from typing import Final

_PREFIX: Final = "type.googleapis.com/"

CLUSTER: Final = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER: Final = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE: Final = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
SECRET: Final = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
# VHDS: one virtual host of a route configuration, fetched by an on-demand sidecar the
# first time its app calls the host (delta xDS only).
VIRTUAL_HOST: Final = _PREFIX + "envoy.config.route.v3.VirtualHost"

# Make-before-break: a cluster before its endpoints, a listener before its routes, and
# clusters before the listeners and routes that point at them; virtual hosts after the
# route configuration they belong to.
PUSH_ORDER: Final[tuple[str, ...]] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, VIRTUAL_HOST, SECRET)

# In state-of-the-world, a response of these types is the whole set: what is missing is
# deleted. EDS, RDS and SDS responses may carry only some resources.
FULL_STATE: Final[frozenset[str]] = frozenset({CLUSTER, LISTENER})

SHORT_NAMES: Final[dict[str, str]] = {
    CLUSTER: "cds",
    ENDPOINT: "eds",
    LISTENER: "lds",
    ROUTE: "rds",
    VIRTUAL_HOST: "vhds",
    SECRET: "sds",
}


def short_name(type_url: str) -> str:
    """``cds``, ``eds``...: for metric labels and logs; unknown types keep their URL."""
    return SHORT_NAMES.get(type_url, type_url.removeprefix(_PREFIX))
