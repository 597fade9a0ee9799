"""Governance features, one module each, applied in this order by the translator."""

from controlplane.translator.policies.base import Feature
from controlplane.translator.policies.circuit_breaking import CircuitBreaking
from controlplane.translator.policies.fallback import Fallback
from controlplane.translator.policies.fault import Fault
from controlplane.translator.policies.load_balancing import LoadBalancing
from controlplane.translator.policies.outlier_detection import OutlierDetection
from controlplane.translator.policies.rate_limit import RateLimit
from controlplane.translator.policies.retries import Retries
from controlplane.translator.policies.timeouts import Timeouts
from controlplane.translator.policies.traffic import Traffic

FEATURES: tuple[Feature, ...] = (
    LoadBalancing(),
    CircuitBreaking(),
    OutlierDetection(),
    Timeouts(),
    Retries(),
    Traffic(),
    Fault(),
    RateLimit(),
    Fallback(),
)

__all__ = ["FEATURES", "Feature"]
