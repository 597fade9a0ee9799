"""Governance features, one module each, applied in this order by the translator."""

from controlplane.translator.policies.base import Feature
from controlplane.translator.policies.circuit_breaking import CircuitBreaking
from controlplane.translator.policies.load_balancing import LoadBalancing
from controlplane.translator.policies.outlier_detection import OutlierDetection
from controlplane.translator.policies.retries import Retries
from controlplane.translator.policies.timeouts import Timeouts

FEATURES: tuple[Feature, ...] = (
    LoadBalancing(),
    CircuitBreaking(),
    OutlierDetection(),
    Timeouts(),
    Retries(),
)

__all__ = ["FEATURES", "Feature"]
