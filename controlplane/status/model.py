"""A CSDS answer as rows: plain functions from ClientStatusResponse to ProxyStatus.

The wire contract with the server (server/csds_config.py): the node's metadata carries
``controlplane_replica``, ``controlplane_protocol``, ``controlplane_connected_at`` and,
per type, ``controlplane_xds.<short type>`` = status, versions, error, ``held``. A server
that does not send them (another control plane) is read from the per-resource entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import json_format

from controlplane import resource

REPLICA_KEY = "controlplane_replica"
PROTOCOL_KEY = "controlplane_protocol"
CONNECTED_KEY = "controlplane_connected_at"
XDS_KEY = "controlplane_xds"
COLUMNS: tuple[str, ...] = ("cds", "lds", "eds", "rds", "sds")
# CSDS ConfigStatus -> what the table shows
SHOWN = {"SYNCED": "SYNCED", "STALE": "STALE", "ERROR": "NACKED", "NOT_SENT": "NOT SENT",
         "UNKNOWN": "UNKNOWN"}


@dataclass(frozen=True, slots=True)
class TypeView:
    status: str  # a CSDS ConfigStatus name
    error: str = ""
    sent_version: str = ""
    acked_version: str = ""
    current_version: str = ""
    held_known: bool = True

    @property
    def shown(self) -> str:
        return SHOWN.get(self.status, self.status)


@dataclass(frozen=True, slots=True)
class ProxyStatus:
    node_id: str
    service: str
    namespace: str
    protocol: str
    replica: str
    connected_at: float
    types: Mapping[str, TypeView] = field(default_factory=dict)

    @property
    def synced(self) -> bool:
        return all(view.status == "SYNCED" for view in self.types.values())

    def laggard(self) -> str:
        """What is not synced, e.g. ``lds NACKED: <error>; eds STALE``."""
        parts = []
        for name, view in self.types.items():
            if view.status != "SYNCED":
                parts.append(f"{name} {view.shown}" + (f": {view.error}" if view.error else ""))
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node_id, "service": self.service, "namespace": self.namespace,
                "protocol": self.protocol, "replica": self.replica,
                "synced": self.synced,
                "types": {name: {"status": view.shown, "error": view.error or None,
                                 "sent_version": view.sent_version,
                                 "acked_version": view.acked_version}
                          for name, view in self.types.items()}}


def _text(fields: Mapping[str, Any], key: str) -> str:
    value = fields.get(key)
    return value.string_value if value is not None else ""


def rows(answer: csds_pb2.ClientStatusResponse, address: str) -> list[ProxyStatus]:
    """The proxies one replica (at ``address``) reports."""
    return [proxy_status(config, address) for config in answer.config]


def proxy_status(config: csds_pb2.ClientConfig, address: str) -> ProxyStatus:
    node = config.node
    meta = node.metadata.fields
    summary = meta.get(XDS_KEY)
    types: dict[str, TypeView] = {}
    if summary is not None and summary.HasField("struct_value"):
        for name, value in summary.struct_value.fields.items():
            each = value.struct_value.fields
            types[name] = TypeView(_text(each, "status"), _one_line(_text(each, "error")),
                                   _text(each, "sent_version"), _text(each, "acked_version"),
                                   _text(each, "current_version"),
                                   _text(each, "held") != "unknown")
    else:
        types = _from_entries(config.generic_xds_configs)
    connected = meta.get(CONNECTED_KEY)
    return ProxyStatus(
        node_id=node.id, service=node.cluster, namespace=_text(meta, "namespace") or "default",
        protocol=_text(meta, PROTOCOL_KEY) or "?", replica=_text(meta, REPLICA_KEY) or address,
        connected_at=connected.number_value if connected is not None else 0.0,
        types=dict(sorted(types.items(), key=lambda item: _column(item[0]))))


def _from_entries(entries: Iterable[csds_pb2.ClientConfig.GenericXdsConfig]
                  ) -> dict[str, TypeView]:
    """Per type, the worst status of its resources (a server without our summary)."""
    rank = ["SYNCED", "NOT_SENT", "STALE", "ERROR"]
    worst: dict[str, TypeView] = {}
    for entry in entries:
        name = resource.short_name(entry.type_url)
        status = csds_pb2.ConfigStatus.Name(entry.config_status)
        error = _one_line(entry.error_state.details) if entry.HasField("error_state") else ""
        old = worst.get(name)
        if old is None or (status in rank and old.status in rank
                           and rank.index(status) > rank.index(old.status)):
            worst[name] = TypeView(status, error, entry.version_info)
    return worst


def _one_line(text: str) -> str:
    """Envoy's error text on one line (it ends its messages with a newline)."""
    return " ".join(text.split())


def _column(name: str) -> int:
    return COLUMNS.index(name) if name in COLUMNS else len(COLUMNS)


def merge(found: Iterable[ProxyStatus]) -> list[ProxyStatus]:
    """Each proxy once: one that several replicas report (it reconnected, its old
    connection not yet gone) is taken from the one where it connected last."""
    newest: dict[str, ProxyStatus] = {}
    for proxy in found:
        old = newest.get(proxy.node_id)
        if old is None or proxy.connected_at > old.connected_at:
            newest[proxy.node_id] = proxy
    return [newest[key] for key in sorted(newest)]


def client_status_name(value: int) -> str:
    return str(config_dump_shared_pb2.ClientResourceStatus.Name(value))


def to_json(message: Any) -> dict[str, Any]:
    """A message as JSON; an Any of a type this process does not know shows its reason."""
    try:
        return dict(json_format.MessageToDict(message, preserving_proto_field_name=True))
    except (TypeError, KeyError, json_format.Error) as exc:
        return {"error": f"cannot render as JSON: {exc}"}
