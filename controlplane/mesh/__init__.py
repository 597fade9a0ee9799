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
    Endpoint,
    Fault,
    LoadBalancer,
    Mesh,
    OutlierDetection,
    Policy,
    RateLimit,
    Retries,
    Service,
    SplitTarget,
)

__all__ = [
    "CircuitBreaker",
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
    "SplitTarget",
    "load_mesh_bytes",
    "load_mesh_data",
    "load_mesh_file",
    "load_mesh_text",
]
