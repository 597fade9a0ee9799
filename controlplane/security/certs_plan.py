"""What ``controlplane certs`` needs, read from the gRPC client's own bootstrap.

The bootstrap ``controlplane bootstrap --grpc --cert-dir DIR`` wrote already says
everything: the xDS server and how to trust it, the token file, the node the client is
(its id is what the token is bound to), and the files gRPC's ``file_watcher`` reads. So
the command takes that one file and asks for the certificate as that very node: the
agent and the client can never disagree on a flag. Pure: JSON in, a plan out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from controlplane.security import grpc_certs

MAX_BOOTSTRAP_BYTES = 1024 * 1024


class PlanError(ValueError):
    """The bootstrap cannot drive the command; the message says what to fix."""


@dataclass(frozen=True)
class CertsPlan:
    """Where to ask, as whom, and where the files go."""

    server: str
    """HOST:PORT (``[v6]:PORT``) of the xDS server."""
    ca_file: str | None
    """The control plane's trust bundle: TLS to the server. None: plaintext."""
    token_file: str | None
    """Sent as ``authorization: Bearer``, read again for every new stream."""
    node: base_pb2.Node
    cert_file: Path
    key_file: Path
    bundle_file: Path

    @property
    def directory(self) -> Path:
        return self.key_file.parent


def read_plan(path: str) -> CertsPlan:
    """The plan of the bootstrap at ``path``; PlanError naming what is missing."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BOOTSTRAP_BYTES + 1)
    except OSError as exc:
        raise PlanError(f"cannot read the bootstrap {path}: {exc.strerror}; give the file "
                        "`controlplane bootstrap --grpc --cert-dir DIR -o FILE` wrote "
                        "(--bootstrap, or GRPC_XDS_BOOTSTRAP)") from None
    if len(raw) > MAX_BOOTSTRAP_BYTES:
        raise PlanError(f"the bootstrap {path} is larger than {MAX_BOOTSTRAP_BYTES} bytes")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise PlanError(f"the bootstrap {path} is not JSON: {exc}") from None
    return plan_of(data, path)


def plan_of(data: Any, where: str = "the bootstrap") -> CertsPlan:
    if not isinstance(data, dict):
        raise PlanError(f"{where}: a gRPC bootstrap is a JSON object")
    servers = data.get("xds_servers")
    if not isinstance(servers, list) or not servers or not isinstance(servers[0], dict):
        raise PlanError(f"{where}: xds_servers[0] is missing")
    server = servers[0]
    uri = server.get("server_uri")
    if not isinstance(uri, str) or not uri:
        raise PlanError(f"{where}: xds_servers[0].server_uri is missing")
    ca_file: str | None = None
    for creds in server.get("channel_creds") or []:
        if isinstance(creds, dict) and creds.get("type") == "tls":
            ca_file = str((creds.get("config") or {}).get("ca_certificate_file") or "") or None
            if ca_file is None:
                raise PlanError(f"{where}: xds_servers[0].channel_creds tls has no "
                                "ca_certificate_file; make the bootstrap with --xds-ca")
            break
    token_file: str | None = None
    for creds in server.get("call_creds") or []:
        if isinstance(creds, dict) and creds.get("type") == "jwt_token_file":
            token_file = str((creds.get("config") or {}).get("jwt_token_file") or "") or None
    node = base_pb2.Node()
    try:
        json_format.ParseDict(data.get("node") or {}, node, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise PlanError(f"{where}: node: {exc}") from None
    if not node.id:
        raise PlanError(f"{where}: node.id is missing")
    providers = data.get("certificate_providers")
    provider = providers.get(grpc_certs.PROVIDER_INSTANCE) if isinstance(providers, dict) else None
    if not isinstance(provider, dict) or provider.get("plugin_name") != "file_watcher" \
            or not isinstance(config := provider.get("config"), dict):
        raise PlanError(f"{where}: no file_watcher certificate provider "
                        f"{grpc_certs.PROVIDER_INSTANCE!r}: make the bootstrap with "
                        "`controlplane bootstrap --grpc --cert-dir DIR`")
    files = []
    for key in ("certificate_file", "private_key_file", "ca_certificate_file"):
        value = config.get(key)
        if not isinstance(value, str) or not value:
            raise PlanError(f"{where}: certificate_providers.{grpc_certs.PROVIDER_INSTANCE}"
                            f".config.{key} is missing")
        files.append(Path(value))
    if len({f.parent for f in files}) != 1:
        raise PlanError(f"{where}: the certificate, key and CA files must share one "
                        "directory (as --cert-dir writes them)")
    return CertsPlan(uri, ca_file, token_file, node, files[0], files[1], files[2])
