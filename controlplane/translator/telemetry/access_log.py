"""The JSON access log: one line per request (or TCP connection) on the sidecar's stdout.

Keys are fixed (README); values are Envoy command operators. The sidecar's own service
comes from its node (``node.cluster`` and ``node.metadata.namespace``, as the bootstrap
sets them) rather than a literal, so a listener shared by sidecars of several services
(a captured egress listener) stays shared. An outbound call's destination is its
cluster's ``controlplane`` metadata (translator/clusters.py); an inbound call's caller is
the ``x-controlplane-source`` header its own sidecar set (routes.py).
"""

from __future__ import annotations

from typing import Final, Literal

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import substitution_format_string_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from google.protobuf import struct_pb2

from controlplane.translator import names
from controlplane.translator.protoutil import pack

Direction = Literal["inbound", "outbound"]

STDOUT_LOGGER: Final = "envoy.access_loggers.stdout"
METADATA_NAMESPACE: Final = names.METADATA
SOURCE_HEADER: Final = names.SOURCE_HEADER
OWN_SERVICE: Final = "%CEL(xds.node.cluster)%.%CEL(xds.node.metadata.namespace)%"
_DESTINATION: Final = f"%CLUSTER_METADATA({METADATA_NAMESPACE}:service)%"

_COMMON: Final = {
    "start_time": "%START_TIME%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
}
_HTTP: Final = {
    "method": "%REQ(:METHOD)%",
    "authority": "%REQ(:AUTHORITY)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "traceparent": "%REQ(TRACEPARENT)%",
}
HTTP_KEYS: Final = (
    "start_time", "method", "authority", "path", "protocol", "status", "flags",
    "duration_ms", "upstream_host", "upstream_cluster", "bytes_received", "bytes_sent",
    "request_id", "traceparent", "source_service", "destination_service", "direction",
)


def log_format(direction: Direction, http: bool) -> dict[str, str]:
    """Key -> command operator, in ``HTTP_KEYS`` order (TCP: the keys that apply)."""
    ends = ({"source_service": OWN_SERVICE, "destination_service": _DESTINATION}
            if direction == "outbound" else
            {"source_service": f"%REQ({SOURCE_HEADER})%" if http else "-",
             "destination_service": OWN_SERVICE})
    values = {**_COMMON, **(_HTTP if http else {}), **ends, "direction": direction}
    return {key: values[key] for key in HTTP_KEYS if key in values}


def access_log(direction: Direction, http: bool) -> accesslog_pb2.AccessLog:
    """One JSON object per line to ``/dev/stdout``."""
    fields = struct_pb2.Struct()
    for key, value in log_format(direction, http).items():
        fields.fields[key].string_value = value
    config = stream_pb2.StdoutAccessLog(
        log_format=substitution_format_string_pb2.SubstitutionFormatString(
            json_format=fields))
    return accesslog_pb2.AccessLog(name=STDOUT_LOGGER, typed_config=pack(config))
