"""``policy.outlier_detection``: eject hosts that keep failing, for a while."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2

from controlplane.mesh.model import OutlierDetection as OutlierPolicy
from controlplane.mesh.model import Service, ServicePort
from controlplane.translator.policies.base import Feature
from controlplane.translator.protoutil import duration


class OutlierDetection(Feature):
    name = "outlier_detection"

    def cluster(self, service: Service, port: ServicePort, cluster: cluster_pb2.Cluster) -> None:
        if service.policy.outlier_detection is not None:
            cluster.outlier_detection.CopyFrom(outlier_detection(service.policy.outlier_detection))


def outlier_detection(policy: OutlierPolicy) -> outlier_detection_pb2.OutlierDetection:
    """Envoy enforces gateway-failure ejection at 0% unless told otherwise, and 5xx
    ejection at 100% with a threshold of 5 even when unset: a policy that names only
    gateway errors gets exactly that, as in Istio."""
    detection = outlier_detection_pb2.OutlierDetection()
    if policy.consecutive_5xx is not None:
        detection.consecutive_5xx.value = policy.consecutive_5xx
    if policy.consecutive_gateway_errors is not None:
        detection.consecutive_gateway_failure.value = policy.consecutive_gateway_errors
        detection.enforcing_consecutive_gateway_failure.value = 100
        if policy.consecutive_5xx is None:
            detection.enforcing_consecutive_5xx.value = 0
    if policy.interval is not None:
        detection.interval.CopyFrom(duration(policy.interval))
    if policy.base_ejection_time is not None:
        detection.base_ejection_time.CopyFrom(duration(policy.base_ejection_time))
    if policy.max_ejection_percent is not None:
        detection.max_ejection_percent.value = round(policy.max_ejection_percent)
    return detection
