"""The mesh model and the loader that turns YAML into it."""

from controlplane.mesh.incremental import MeshLoader
from controlplane.mesh.loader import (
    load_mesh_bytes,
    load_mesh_data,
    load_mesh_file,
    load_mesh_text,
)
from controlplane.mesh.model import (
    CircuitBreaker,
    Egress,
    Endpoint,
    Fault,
    LoadBalancer,
    Mesh,
    OutlierDetection,
    Policy,
    RateLimit,
    Retries,
    Service,
    Sidecar,
    SplitTarget,
    WorkloadSelector,
)

__all__ = [
    "CircuitBreaker",
    "Egress",
    "Endpoint",
    "Fault",
    "LoadBalancer",
    "Mesh",
    "MeshLoader",
    "OutlierDetection",
    "Policy",
    "RateLimit",
    "Retries",
    "Service",
    "Sidecar",
    "SplitTarget",
    "WorkloadSelector",
    "load_mesh_bytes",
    "load_mesh_data",
    "load_mesh_file",
    "load_mesh_text",
]
