"""What CSDS says of one proxy: plain functions over its streams' state.

Per type the proxy subscribes to, one status (``type_status``), by the rules of
``envoy.service.status.v3``: SYNCED when the version sent is the one ACKed and the
stream is up to date with the proxy's current snapshot, NOT_SENT before anything was
sent, STALE while a push awaits its ACK or the stream has not caught up with the current
snapshot, ERROR when the last push of the type was NACKed.
Per resource served, a ``GenericXdsConfig`` with that status; when the server knows the
proxy holds another content of a resource (it ACKed an older version), a second entry
with that content and its ACKed version, so a client can show the difference.

The node of the answer is the proxy's own, with its metadata plus ``controlplane_replica``
(this server), ``controlplane_protocol``, ``controlplane_connected_at`` (when its newest
stream began, so a client asking several replicas keeps the newest) and
``controlplane_xds``: per type the status,
the versions sent, ACKed and current, the last NACK's error, and ``held``: whether
the server knows the content the proxy holds (``unknown`` after a restart or a
reconnect to another replica until its next ACK). A type with no resource
still has its status there.

Secrets are shown as ``/debug/config_dump`` shows them: their ``message``, whose private
key is ``[redacted]`` (cache/secrets.py); the wire bytes of a secret are never used here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from envoy.admin.v3 import config_dump_shared_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import any_pb2

from controlplane import resource
from controlplane.cache.snapshot import Resource, Snapshot, TypeSnapshot
from controlplane.server.stream import StreamBase, TypeState

REPLICA_KEY = "controlplane_replica"
PROTOCOL_KEY = "controlplane_protocol"
CONNECTED_KEY = "controlplane_connected_at"  # the newest stream's start (seconds, epoch)
XDS_KEY = "controlplane_xds"
_STATUS = csds_pb2.ConfigStatus
_CLIENT = config_dump_shared_pb2.ClientResourceStatus


@dataclass(frozen=True, slots=True)
class TypeStatus:
    """One type on one proxy, as CSDS reports it."""

    type_url: str
    config_status: str  # SYNCED | NOT_SENT | STALE | ERROR
    client_status: str  # ACKED | NACKED | REQUESTED
    sent_version: str
    acked_version: str
    current_version: str
    error: str = ""
    nacked_version: str = ""
    nacked_at: float | None = None


def type_status(type_url: str, state: TypeState, current: str | None) -> TypeStatus:
    """The status of ``type_url`` on a stream whose state is ``state``, while the proxy's
    current snapshot has ``current`` as that type's version (None: no snapshot yet)."""
    sent, acked, now = state.sent_version, state.acked_version, current or ""

    def status(config: str, client: str) -> TypeStatus:
        return TypeStatus(type_url, config, client, sent, acked, now)

    nack = state.last_nack
    if not state.nonce:
        return status("NOT_SENT", "REQUESTED")
    if nack is not None and state.nacked_version == sent and acked != sent:
        return TypeStatus(type_url, "ERROR", "NACKED", sent, acked, now, nack.error,
                          nack.version, nack.at)
    if acked != sent:
        return status("STALE", "REQUESTED")
    # What the stream last brought the client up to date with: a change to resources it
    # does not subscribe to moves that on without a push (and without a new version sent).
    base = getattr(state, "base", None)
    if current is not None and (base.version if base is not None else sent) != current:
        return status("STALE", "ACKED")
    return status("SYNCED", "ACKED")


def in_scope(typed: TypeSnapshot | None, state: TypeState) -> dict[str, Resource]:
    """The resources of ``typed`` the stream subscribes to (its wildcard, or its names)."""
    if typed is None:
        return {}
    found = typed.resources
    if state.wildcard:
        if typed.wildcard is None:
            return dict(found)
        return {name: found[name] for name in typed.wildcard if name in found}
    return {name: found[name] for name in state.subscription() if name in found}


def packed(item: Resource) -> any_pb2.Any:
    """A resource as an Any: its prepared bytes (no second serialization), except a
    secret, which is packed from its redacted message."""
    if item.type_url == resource.SECRET:
        shown = any_pb2.Any()
        shown.Pack(item.message, type_url_prefix="type.googleapis.com/")
        return shown
    chunk = item.sotw_chunk  # field 2 of a DiscoveryResponse: tag, length, then the Any
    index = 1
    while chunk[index] & 0x80:
        index += 1
    return any_pb2.Any.FromString(chunk[index + 1:])


@dataclass(frozen=True, slots=True)
class Proxy:
    """One connected proxy: its newest stream (node, protocol) and per type the stream
    that serves it (a proxy on per-type services has one stream per type)."""

    node: base_pb2.Node
    protocol: str
    api: str
    types: Mapping[str, StreamBase]
    connected_at: float


def proxies(streams: Iterable[StreamBase]) -> dict[str, Proxy]:
    """Connected proxies by node id, from the streams open now (the newest stream of a
    node wins per type: a proxy that reconnects briefly has two)."""
    by_node: dict[str, list[StreamBase]] = {}
    for stream in streams:
        if stream.proxy is not None and stream.node is not None:
            by_node.setdefault(stream.proxy.node_id, []).append(stream)
    found: dict[str, Proxy] = {}
    for node_id, mine in by_node.items():
        mine.sort(key=lambda s: s.stream_id)
        types: dict[str, StreamBase] = {}
        for stream in mine:
            for type_url in stream.type_states():
                types[type_url] = stream
        newest = mine[-1]
        assert newest.node is not None
        found[node_id] = Proxy(newest.node, newest.protocol, newest.api, types,
                               newest.connected_at)
    return found


def client_config(proxy: Proxy, current: Snapshot | None, identifier: str,
                  held: Mapping[str, TypeSnapshot], contents: bool) -> csds_pb2.ClientConfig:
    """The ClientConfig of one proxy. ``current``: its snapshot now; ``held``: per type,
    the snapshot whose version it last ACKed, when the server knows it."""
    config = csds_pb2.ClientConfig()
    config.node.CopyFrom(proxy.node)
    fields = config.node.metadata.fields
    fields[REPLICA_KEY].string_value = identifier
    fields[PROTOCOL_KEY].string_value = proxy.protocol
    fields[CONNECTED_KEY].number_value = proxy.connected_at
    summary = fields[XDS_KEY].struct_value.fields
    for type_url in sorted(proxy.types, key=_order):
        stream = proxy.types[type_url]
        state = stream.type_states()[type_url]
        typed_now = current.get(type_url) if current is not None else None
        status = type_status(type_url, state, typed_now.version if typed_now else None)
        entry = summary[resource.short_name(type_url)].struct_value.fields
        for key, value in (("status", status.config_status),
                           ("client_status", status.client_status),
                           ("sent_version", status.sent_version),
                           ("acked_version", status.acked_version),
                           ("current_version", status.current_version),
                           ("error", status.error)):
            entry[key].string_value = value
        sent = stream.snapshot.get(type_url) if stream.snapshot is not None else None
        served = in_scope(sent, state)
        holds = _holds(held.get(type_url), state, sent, served)
        entry["held"].string_value = "unknown" if holds is None else "known"
        _entries(config, status, served, holds, contents)
    return config


def _holds(acked: TypeSnapshot | None, state: TypeState, sent: TypeSnapshot | None,
           served: dict[str, Resource]) -> dict[str, Resource] | None:
    """What the proxy holds of a type, as far as the server knows (None: it does not)."""
    if not state.acked_version:
        return {}
    if state.acked_version == state.sent_version and sent is not None \
            and sent.version == state.sent_version:
        return served
    if acked is not None and acked.version == state.acked_version:
        return in_scope(acked, state)
    return None


def _entries(config: csds_pb2.ClientConfig, status: TypeStatus, served: dict[str, Resource],
             holds: dict[str, Resource] | None, contents: bool) -> None:
    for name in sorted(served):
        item = served[name]
        entry = config.generic_xds_configs.add(
            type_url=status.type_url, name=name, version_info=status.sent_version,
            config_status=_STATUS.Value(status.config_status))
        same = holds is not None and name in holds and holds[name].version == item.version
        entry.client_status = _CLIENT.Value("ACKED" if same else status.client_status)
        if contents:
            entry.xds_config.CopyFrom(packed(item))
        if status.config_status == "ERROR" and not same:
            failed = entry.error_state
            failed.details = status.error
            failed.version_info = status.nacked_version
            if status.nacked_at is not None:
                failed.last_update_attempt.FromNanoseconds(int(status.nacked_at * 1e9))
            if contents:
                failed.failed_configuration.CopyFrom(packed(item))
    for name in sorted(holds or ()):
        assert holds is not None
        item = holds[name]
        if name in served and served[name].version == item.version:
            continue
        entry = config.generic_xds_configs.add(
            type_url=status.type_url, name=name, version_info=status.acked_version,
            config_status=_STATUS.Value(status.config_status),
            client_status=_CLIENT.Value("ACKED"))
        if contents:
            entry.xds_config.CopyFrom(packed(item))


def _order(type_url: str) -> int:
    order = resource.PUSH_ORDER
    return order.index(type_url) if type_url in order else len(order)
