"""The Kubernetes source: Services, EndpointSlices and TrafficPolicies, watched."""

from controlplane.sources.kubernetes.client import api_client
from controlplane.sources.kubernetes.source import Debounce, KubernetesSource
from controlplane.sources.kubernetes.watch import WatchTiming

__all__ = ["Debounce", "KubernetesSource", "WatchTiming", "api_client"]
