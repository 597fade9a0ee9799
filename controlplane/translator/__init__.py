"""The translator: pure functions from mesh state and a proxy's identity to Envoy v3
resources. No I/O, so it is tested with golden files and reused by every consumer."""

from controlplane.translator.routes import egress_route
from controlplane.translator.translate import (
    Resources,
    ServiceResources,
    captured_egress,
    loopback_egress,
    proxy_resources,
    resource_name,
    service_resources,
    translate,
)

__all__ = [
    "Resources",
    "ServiceResources",
    "captured_egress",
    "egress_route",
    "loopback_egress",
    "proxy_resources",
    "resource_name",
    "service_resources",
    "translate",
]
