"""gRPC server reflection on the xDS port: generic clients (grpcurl, Postman, a
descriptor-pool client) discover the xDS and CSDS services without compiled stubs."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from envoy.service.cluster.v3 import cds_pb2
from envoy.service.discovery.v3 import ads_pb2
from envoy.service.endpoint.v3 import eds_pb2
from envoy.service.listener.v3 import lds_pb2
from envoy.service.route.v3 import rds_pb2
from envoy.service.secret.v3 import sds_pb2
from envoy.service.status.v3 import csds_pb2
from grpc_reflection.v1alpha import reflection

# Importing the modules above puts their files in protobuf's default pool, which the
# reflection service reads.
_FILES = (ads_pb2, cds_pb2, eds_pb2, lds_pb2, rds_pb2, sds_pb2, csds_pb2)


def enable(server: grpc.aio.Server, services: Iterable[str]) -> None:
    """Serve reflection for ``services`` (those the server has; before it starts)."""
    known = {service.full_name for module in _FILES
             for service in module.DESCRIPTOR.services_by_name.values()}
    names = [name for name in services if name in known]
    reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)
