"""Bounds on everything an xDS client controls, and a per-stream budget for log lines.

A client picks its node id, its metadata, the names it asks for and the type URLs it
sends. Each of those ends up in memory, in logs or in a snapshot group, so each has a
bound; past it the stream ends with a gRPC status that says which bound and what to do.
It also picks how fast it reads: large writes take turns (``max_large_writes``), so a
thousand sidecars syncing at once, or a few that do not read, cannot starve the others.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2

MAX_ERROR_CHARS = 4096  # of a NACK's error message, as kept per stream and shown
MAX_VERSION_CHARS = 256  # of a version a client reports, as kept per stream


@dataclass(frozen=True, slots=True)
class Limits:
    """Defaults sit far above what a real Envoy sends (Istio's node metadata is a few
    KiB; a 10,000-service mesh subscribes to 10,000 names)."""

    max_node_id_bytes: int = 1024
    """node.id, node.cluster and node.locality.zone, each: they go in every log line."""
    max_node_bytes: int = 64 * 1024
    """The whole Node as serialized, metadata included."""
    max_names_per_request: int = 100_000
    """Resource names in one request (SotW names; delta subscribe + unsubscribe +
    initial versions)."""
    max_name_bytes: int = 4096
    """One resource name or type URL."""
    max_unknown_types: int = 16
    """Distinct type URLs this server does not serve, per stream."""
    max_streams: int = 0
    """Open streams at once (0: no cap)."""
    log_lines_per_second: float = 5.0
    """Warnings one stream may cause per second; the rest are counted, not written."""
    max_request_bytes: int = 16 * 1024 * 1024
    """gRPC's receive limit for one request message."""
    max_large_writes: int = 16
    """Large responses being written at once, over every stream (0: no bound). More wait
    their turn in arrival order; small ones (an endpoint change) never wait."""
    large_write_bytes: int = 64 * 1024
    """From this size on a response is large: an initial sync or a whole CDS or RDS of a
    big mesh. It is encoded only when its turn comes."""
    large_write_turn_seconds: float = 1.0
    """How long a large write keeps its turn: a client that does not read then goes on
    being written to without one, and the next waiting write starts."""


class LimitError(Exception):
    """A client went past a bound; the stream ends with ``status`` and this text."""

    def __init__(self, message: str, status: str = "RESOURCE_EXHAUSTED",
                 reason: str = "node") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # the metric label: node, names, unknown_types


def check_node(node: base_pb2.Node, limits: Limits) -> None:
    """Refuse a node whose identity is too big to log or to keep."""
    for field, value in (("node.id", node.id), ("node.cluster", node.cluster),
                         ("node.locality.zone", node.locality.zone)):
        size = len(value.encode())
        if size > limits.max_node_id_bytes:
            raise LimitError(
                f"{field} is {size} bytes, more than the {limits.max_node_id_bytes} this "
                f"server accepts; use a short id such as <pod>.<namespace>",
                "INVALID_ARGUMENT")
    metadata = node.metadata.fields
    for key in ("namespace", "inbound_address"):
        value = metadata.get(key)
        if value is None or value.WhichOneof("kind") != "string_value":
            continue
        size = len(value.string_value.encode())
        if size > limits.max_node_id_bytes:
            raise LimitError(
                f"node.metadata.{key} is {size} bytes, more than the "
                f"{limits.max_node_id_bytes} this server accepts", "INVALID_ARGUMENT")
    address = metadata.get("inbound_address")
    if address is not None and address.WhichOneof("kind") == "string_value" \
            and address.string_value and not _is_ip(address.string_value):
        raise LimitError(
            f"node.metadata.inbound_address {address.string_value[:64]!r} is not an IP "
            f"address; Envoy would refuse a listener on it (controlplane bootstrap "
            f"--inbound-address takes an IP)", "INVALID_ARGUMENT")
    size = node.ByteSize()
    if size > limits.max_node_bytes:
        raise LimitError(
            f"the node is {size} bytes, more than the {limits.max_node_bytes} this server "
            f"accepts; send less node.metadata (namespace and ports are all it reads)",
            "INVALID_ARGUMENT")


def check_versions(versions: dict[str, str], limits: Limits) -> None:
    """A delta client's initial_resource_versions: the versions are kept per stream."""
    for name, version in versions.items():
        if len(version) > MAX_VERSION_CHARS:
            raise LimitError(
                f"initial_resource_versions[{name[:100]!r}] is {len(version)} characters, "
                f"more than the {MAX_VERSION_CHARS} this server accepts; send back the "
                f"versions it sent", "INVALID_ARGUMENT", "names")


def check_names(names: Sequence[str], limits: Limits, what: str = "resource names") -> None:
    """Refuse a request that names too many resources, or too long a name."""
    if len(names) > limits.max_names_per_request:
        raise LimitError(
            f"{len(names)} {what} in one request, more than the "
            f"{limits.max_names_per_request} this server accepts; subscribe with the "
            f"wildcard instead of listing every name", reason="names")
    if not names or max(map(len, names)) <= limits.max_name_bytes:
        return  # (one pass in C: a thousand names per subscription, a thousand streams)
    for name in names:
        if len(name) > limits.max_name_bytes:
            raise LimitError(
                f"a resource name of {len(name)} characters, more than the "
                f"{limits.max_name_bytes} this server accepts; no resource it serves has "
                f"such a name", "INVALID_ARGUMENT", "names")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class LogBudget:
    """Token bucket for one stream's log lines: ``rate`` a second, bursts of ``rate``.
    What is refused is counted, and the count goes out with the next line allowed."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = rate
        self._at = time.monotonic()
        self.suppressed = 0

    def take(self) -> int | None:
        """None when this line must be dropped; else how many were dropped before it."""
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            self.suppressed += 1
            return None
        self._tokens -= 1
        dropped, self.suppressed = self.suppressed, 0
        return dropped
