"""Asking replicas for the client status (CSDS FetchClientStatus), over plaintext or the
xDS port's TLS, with a bearer token when the server wants one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.service.status.v3 import csds_pb2
from envoy.type.matcher.v3 import node_pb2, string_pb2

FETCH = "/envoy.service.status.v3.ClientStatusDiscoveryService/FetchClientStatus"
CALL_TIMEOUT = 30.0  # seconds for one answer once connected (a big fleet takes a while)
MAX_ANSWER_BYTES = 256 * 1024 * 1024


class StatusError(Exception):
    """A replica did not answer; the message says what to check."""


@dataclass(frozen=True)
class Connection:
    """How to reach the replicas: TLS when ``ca`` is given, a token when given."""

    ca: bytes | None = None
    server_name: str | None = None
    token: str | None = None
    connect_timeout: float = 5.0

    @classmethod
    def from_files(cls, ca: str | None, server_name: str | None, token_file: str | None,
                   connect_timeout: float) -> Connection:
        try:
            ca_pem = Path(ca).read_bytes() if ca else None
            token = Path(token_file).read_text().strip() if token_file else None
        except OSError as exc:
            raise StatusError(f"cannot read {exc.filename}: {exc.strerror}; check "
                              "--ca / --token-file") from None
        if token_file and not token:
            raise StatusError(f"--token-file {token_file} is empty; give a token of the "
                              "control plane's namespace")
        return cls(ca_pem, server_name, token, connect_timeout)


def request(node: str | None = None, contents: bool = False) -> csds_pb2.ClientStatusRequest:
    """Every proxy (or only node id ``node``), with resource contents or without."""
    asked = csds_pb2.ClientStatusRequest(exclude_resource_contents=not contents)
    if node is not None:
        asked.node_matchers.append(
            node_pb2.NodeMatcher(node_id=string_pb2.StringMatcher(exact=node)))
    return asked


def fetch(address: str, connection: Connection,
          asked: csds_pb2.ClientStatusRequest) -> csds_pb2.ClientStatusResponse:
    """One replica's answer; StatusError when it gives none."""
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_ANSWER_BYTES)]
    if connection.ca is not None:
        if connection.server_name:
            options.append(("grpc.ssl_target_name_override", connection.server_name))
        channel = grpc.secure_channel(
            address, grpc.ssl_channel_credentials(root_certificates=connection.ca), options)
    else:
        channel = grpc.insecure_channel(address, options)
    metadata = [("authorization", f"Bearer {connection.token}")] if connection.token else []
    with channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=connection.connect_timeout)
        except grpc.FutureTimeoutError:
            tls = "TLS with --ca" if connection.ca is not None else "plaintext"
            raise StatusError(
                f"{address}: no connection within {connection.connect_timeout:g}s ({tls}); "
                "check the address (the xDS port, --server), that the server runs, and "
                "--ca/--server-name when its xDS port speaks TLS") from None
        call = channel.unary_unary(
            FETCH, request_serializer=csds_pb2.ClientStatusRequest.SerializeToString,
            response_deserializer=csds_pb2.ClientStatusResponse.FromString)
        try:
            answer: csds_pb2.ClientStatusResponse = call(
                asked, timeout=CALL_TIMEOUT, metadata=metadata)
        except grpc.RpcError as exc:
            raise StatusError(_explain(address, exc)) from None
    return answer


def _explain(address: str, exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return (f"{address}: it serves no client status (CSDS); is it a controlplane "
                "server of this version, on its xDS port?")
    name = code.name if code is not None else "error"
    return f"{address}: {name}: {details}"
