"""What every xDS stream keeps, whichever protocol it speaks.

The protocol logic (``sotw.py``, ``delta.py``) is plain code over these values: it takes
a request or a new snapshot and returns the pushes to write. The gRPC glue does the I/O.
Everything here dies with the stream (go-control-plane #597: state kept after disconnect).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2

from controlplane import resource
from controlplane.cache.snapshot import Snapshot
from controlplane.proxy import ProxyIdentity
from controlplane.server.limits import (
    LimitError,
    Limits,
    check_names,
    check_node,
    check_versions,
)


class ProtocolError(Exception):
    """The client broke the protocol; the stream ends with INVALID_ARGUMENT and this text."""


class MalformedRequest(ProtocolError):
    """The stream's request did not parse."""

    @classmethod
    def of(cls, kind: str, error: str) -> MalformedRequest:
        return cls(f"the request is not a valid {kind} ({error[:200]}); send "
                   "envoy.service.discovery.v3 messages")


@dataclass(slots=True)
class Push:
    """One response, with what the logs and metrics want to know about it.

    ``payload`` is the encoded response, or only its header when ``body`` holds the
    resources' prepared chunks: those are joined when the response is written, so a push
    waiting for its turn holds references to shared bytes, not a copy of them."""

    type_url: str
    nonce: str
    version: str
    payload: bytes
    names: list[str]
    removed: list[str] = field(default_factory=list)
    body: Sequence[bytes] = ()
    body_bytes: int = 0

    @property
    def size(self) -> int:
        """Bytes on the wire (the gRPC frame aside)."""
        return len(self.payload) + self.body_bytes

    def encode(self) -> bytes:
        """The whole response. Not kept: the caller writes it and lets it go."""
        if not self.body:
            return self.payload
        return b"".join(itertools.chain((self.payload,), self.body))


@dataclass(slots=True)
class Handled:
    """What a request turned out to be, and what to answer."""

    kind: str  # initial | ack | nack | stale | subscribe | unknown_type
    type_url: str
    pushes: list[Push] = field(default_factory=list)
    error: str = ""


@dataclass(slots=True)
class Nack:
    error: str
    version: str
    nonce: str
    at: float


@dataclass(slots=True)
class TypeState:
    """Per type on one stream: what was sent, what the client said of it."""

    nonce: str = ""
    sent_version: str = ""
    acked_version: str = ""
    last_nack: Nack | None = None
    nacked_version: str = ""
    pushes: int = 0
    wildcard: bool = False
    names: set[str] = field(default_factory=set)

    def subscription(self) -> Set[str]:
        """The names the client subscribes to (besides a wildcard)."""
        return self.names

    def describe(self) -> dict[str, Any]:
        nack = self.last_nack
        return {
            "sent_version": self.sent_version,
            "acked_version": self.acked_version,
            "nonce": self.nonce,
            "pushes": self.pushes,
            "wildcard": self.wildcard,
            "subscribed": sorted(self.subscription()),
            "last_nack": None
            if nack is None
            else {"error": nack.error, "version": nack.version, "at": nack.at},
        }


class StreamBase:
    """Node, nonces and bookkeeping common to state-of-the-world and delta streams."""

    protocol = "base"

    def __init__(self, stream_id: int, api: str, fixed_type: str | None = None,
                 identifier: str = "", limits: Limits | None = None) -> None:
        self.limits = limits if limits is not None else Limits()
        self.stream_id = stream_id
        self.api = api
        self.fixed_type = fixed_type
        self.node: base_pb2.Node | None = None
        self.proxy: ProxyIdentity | None = None  # as resolved by the mesh (session.py)
        self.declared: ProxyIdentity | None = None  # as its node said, once it joined
        self.snapshot: Snapshot | None = None
        self.connected_at = time.time()
        self.unknown_types: set[str] = set()
        self._nonce = 0
        self._control_plane = base_pb2.ControlPlane(identifier=identifier)

    def accept_node(self, node: base_pb2.Node | None, has_node: bool) -> bool:
        """Keep the node of the first request (set_node_on_first_message_only); True if new."""
        if self.node is not None:
            return False
        if not has_node or node is None or not node.id:
            raise ProtocolError(
                "the first request on a stream must carry a node with an id; "
                "set node.id in the Envoy bootstrap (controlplane bootstrap does)"
            )
        check_node(node, self.limits)
        self.node = node
        self.proxy = ProxyIdentity.from_node(node)
        return True

    def begin(self, request: Any) -> str | None:
        """Every request's first steps: keep the node, check the names, resolve the type
        (None: ignored)."""
        type_url = self.prepare(request)
        if request.DESCRIPTOR.name == "DeltaDiscoveryRequest":
            names = [*request.resource_names_subscribe, *request.resource_names_unsubscribe,
                     *request.initial_resource_versions]
            check_versions(dict(request.initial_resource_versions), self.limits)
        else:
            names = list(request.resource_names)
        check_names(names, self.limits)
        return type_url

    def prepare(self, request: Any) -> str | None:
        """Keep the node, resolve the type: the steps that do not look at each name (a
        state-of-the-world ACK repeats every name; it checks them only when they change)."""
        if self.node is None or request.HasField("node"):
            self.accept_node(request.node, request.HasField("node"))
        type_url: str = request.type_url
        if len(type_url) > self.limits.max_name_bytes:
            check_names([type_url], self.limits, "type URLs")
        return self.resolve_type(type_url)

    def resolve_type(self, type_url: str) -> str | None:
        """The request's type, or None for a type this server does not serve (ignored)."""
        if self.fixed_type is not None:
            if type_url and type_url != self.fixed_type:
                raise ProtocolError(
                    f"type {type_url} requested on the {self.api} service, which serves only "
                    f"{self.fixed_type}; use the matching service or ADS"
                )
            return self.fixed_type
        if not type_url:
            raise ProtocolError(
                "request without type_url on an aggregated (ADS) stream; every ADS request "
                "must name its resource type"
            )
        if type_url not in resource.PUSH_ORDER:
            if (type_url not in self.unknown_types
                    and len(self.unknown_types) >= self.limits.max_unknown_types):
                raise LimitError(
                    f"more than {self.limits.max_unknown_types} type URLs this server does "
                    "not serve on one stream; it serves clusters, endpoints, listeners, "
                    "routes and secrets: ask only for those", reason="unknown_types")
            self.unknown_types.add(type_url)
            return None
        return type_url

    def next_nonce(self) -> str:
        self._nonce += 1
        return str(self._nonce)

    def type_states(self) -> dict[str, TypeState]:
        raise NotImplementedError

    def quick_ack(self, request: Any) -> str | None:
        """The type of ``request`` when it is an ACK that changes nothing but the version
        the client holds (recorded here; nothing to answer), else None: then it goes
        through ``on_request``. Safe while a push of the stream is being written."""
        return None

    def on_request(self, request: Any) -> Handled:
        """Take a request; what it was, and the pushes it calls for."""
        raise NotImplementedError

    def on_snapshot(self, snapshot: Snapshot) -> list[Push]:
        """Take a new snapshot; the pushes it calls for, in ADS order."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The stream as /debug/proxies shows it."""
        proxy, declared = self.proxy, self.declared
        return {
            "stream_id": self.stream_id,
            "node_id": proxy.node_id if proxy else None,
            "service": proxy.service if proxy else None,
            "namespace": proxy.namespace if proxy else None,
            "zone": proxy.zone if proxy else None,
            "group": proxy.group if proxy else None,
            "workload": proxy.workload or None if proxy else None,  # from its credential
            # What its bootstrap said, when the mesh filled in its zone or service.
            "bootstrap": None if declared is None or declared is proxy else {
                "service": declared.service, "zone": declared.zone},
            "protocol": self.protocol,
            "api": self.api,
            "connected_at": self.connected_at,
            "snapshot_version": self.snapshot.version if self.snapshot else None,
            "types": {resource.short_name(t): s.describe() for t, s in self.type_states().items()},
            "unknown_types": sorted(self.unknown_types),
        }


def length_delimited(number: int, value: bytes, repeated: bool = False) -> bytes:
    """A length-delimited protobuf field, as protobuf encodes it: an empty one is left
    out, unless it is an element of a repeated field."""
    if not value and not repeated:
        return b""
    size = len(value)
    prefix = bytearray((number << 3 | 2,))
    while size > 0x7F:
        prefix.append(size & 0x7F | 0x80)
        size >>= 7
    prefix.append(size)
    return bytes(prefix) + value
