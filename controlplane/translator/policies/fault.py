"""``policy.fault``: delay or abort a share of the calls to a service (chaos testing).

The egress listener carries Envoy's fault filter with an empty config, which injects
nothing; each route to a service with a fault policy turns it on with its own HTTPFault,
so a fault never leaks to another service."""

from __future__ import annotations

from typing import Final

from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import percent_pb2

from controlplane.mesh.model import Fault as FaultPolicy
from controlplane.mesh.model import Service, ServicePort
from controlplane.translator.policies.base import Feature
from controlplane.translator.protoutil import duration, pack

FAULT_FILTER: Final = "envoy.filters.http.fault"
_PER_MILLION: Final = 10_000  # one percent, in millionths


class Fault(Feature):
    name = "fault"

    def http_filters(self) -> list[hcm_pb2.HttpFilter]:
        return [hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=pack(fault_pb2.HTTPFault()))]

    def route(self, service: Service, port: ServicePort,
              route: route_components_pb2.Route) -> None:
        if service.policy.fault is not None:
            route.typed_per_filter_config[FAULT_FILTER].CopyFrom(
                pack(http_fault(service.policy.fault))
            )


def fractional_percent(percent: float) -> percent_pb2.FractionalPercent:
    """Per million, so that 0.1% (or 0.0001%) is exact."""
    return percent_pb2.FractionalPercent(
        numerator=round(percent * _PER_MILLION),
        denominator=percent_pb2.FractionalPercent.DenominatorType.MILLION,
    )


def http_fault(policy: FaultPolicy) -> fault_pb2.HTTPFault:
    fault = fault_pb2.HTTPFault()
    if policy.delay is not None:
        fault.delay.CopyFrom(
            common_fault_pb2.FaultDelay(
                fixed_delay=duration(policy.delay.duration),
                percentage=fractional_percent(policy.delay.percent),
            )
        )
    if policy.abort is not None:
        fault.abort.CopyFrom(
            fault_pb2.FaultAbort(
                http_status=policy.abort.status,
                percentage=fractional_percent(policy.abort.percent),
            )
        )
    return fault
