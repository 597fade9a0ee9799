"""``policy.timeout``: the whole request's deadline, retries included."""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2

from controlplane.mesh.model import Service, ServicePort
from controlplane.translator.policies.base import Feature
from controlplane.translator.protoutil import duration


class Timeouts(Feature):
    name = "timeout"

    def route(self, service: Service, port: ServicePort,
              route: route_components_pb2.Route) -> None:
        if service.policy.timeout is not None:
            route.route.timeout.CopyFrom(duration(service.policy.timeout))
