"""The xDS server: protocol logic per stream, and the gRPC services around it."""

from controlplane.server.grpc_server import XdsServer, create_server
from controlplane.server.registry import StreamRegistry

__all__ = ["StreamRegistry", "XdsServer", "create_server"]
