"""Simulated Envoy sidecars for the push benchmarks: S ADS streams (SotW or delta) in
one process, each subscribing like Envoy (CDS wildcard, EDS for the clusters received,
LDS, RDS ``egress``) and ACKing every response, and the marks a bench waits on.

Streams read only the header of each response (version, type, nonce), so the bench's
own CPU stays small; cluster names are read with a names-only message (the field
number of ``Cluster.name``), once per CDS version (delta: a stream's first CDS answer,
which holds every cluster of its version, once per version; later ones each time);
stream 0 (a sidecar of the changed
service, svc-0000) decodes its endpoints to check the new port really arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
from common import BenchError
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import Message
from meshgen import CHANGED_CLUSTER, service_name
from xds_wire import Named, Packed, as_bytes, field, read_header

_TYPES = "type.googleapis.com/"
CDS = _TYPES + "envoy.config.cluster.v3.Cluster"
EDS = _TYPES + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = _TYPES + "envoy.config.listener.v3.Listener"
RDS = _TYPES + "envoy.config.route.v3.RouteConfiguration"
ROUTE_NAME = "egress"
ROUTES = [ROUTE_NAME]  # one list: the encoding of names is kept per list
_ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
SOTW_METHOD = _ADS + "StreamAggregatedResources"
DELTA_METHOD = _ADS + "DeltaAggregatedResources"

STREAMS_PER_CHANNEL = 50
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel, not shared
]


def _ports(assignment: endpoint_pb2.ClusterLoadAssignment) -> list[int]:
    return sorted(lb.endpoint.address.socket_address.port_value
                  for locality in assignment.endpoints for lb in locality.lb_endpoints)


class Mark:
    """Waits until every stream in ``expected`` has passed a point, recording when each
    did (a stream that failed counts as passed: the fleet reports its error)."""

    def __init__(self, fleet: Fleet, expected: Iterable[int] | None = None) -> None:
        self.fleet = fleet
        self.expected = (frozenset(p.index for p in fleet.proxies) if expected is None
                         else frozenset(expected))
        self.times: dict[int, float] = {}
        self.versions: dict[int, str] = {}
        self.acked: dict[int, float] = {}  # wall clock (time.time) of each stream's ACK
        self.others = 0  # hits by streams outside ``expected``
        self.done = asyncio.Event()
        self.check()

    def hit(self, index: int, at: float, version: str = "") -> None:
        if index not in self.expected:
            self.others += 1
        elif index not in self.times:
            self.times[index] = at
            self.versions[index] = version
            self.check()

    def check(self) -> None:
        if self.expected <= (self.times.keys() | self.fleet.errors.keys()):
            self.done.set()


class Proxy:
    """One simulated Envoy on one ADS stream; remembers its latest EDS version."""

    method = ""

    def __init__(self, index: int, node: base_pb2.Node, channel: grpc.aio.Channel,
                 fleet: Fleet, verify: bool) -> None:
        self.index = index
        self.node = node
        self.fleet = fleet
        self.call: Any = channel.stream_stream(
            self.method, request_serializer=self._serialize, response_deserializer=as_bytes)()
        self.clusters: list[str] = []
        self.requested: set[str] = set()
        self.eds_version = ""
        self.eds_responses = 0
        self.verify = verify  # decode svc-0000's endpoints from every EDS response
        self.changed_ports: list[int] | None = None

    @staticmethod
    def _serialize(message: Message | bytes) -> bytes:
        return message if isinstance(message, bytes) else bytes(message.SerializeToString())

    async def run(self) -> None:
        """Read and answer until cancelled; an error ends the stream and is recorded."""
        try:
            await self.start()
            while True:
                raw = await self.call.read()
                if raw is grpc.aio.EOF:
                    raise BenchError("the server ended the stream")
                now = time.perf_counter()
                self.fleet.last_message_at = now
                version, type_url, nonce = read_header(raw)
                await self.on_response(type_url, version, nonce, raw, now)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            if not self.fleet.closing:
                self.fleet.failed(self, f"{exc.code().name}: {exc.details()}")
        except Exception as exc:
            if not self.fleet.closing:
                self.fleet.failed(self, f"{type(exc).__name__}: {exc}")

    async def start(self) -> None:
        raise NotImplementedError

    async def on_response(self, type_url: str, version: str, nonce: str, raw: bytes,
                          now: float) -> None:
        raise NotImplementedError

    def got_endpoints(self, version: str, now: float) -> None:
        self.eds_version = version
        self.eds_responses += 1
        self.fleet.eds_received(self, version, now)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call.cancel()


class SotwProxy(Proxy):
    """State of the world: ACK = version + nonce; EDS names every cluster it knows."""

    method = SOTW_METHOD

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last: dict[str, tuple[str, str]] = {}  # type -> (version, nonce) received

    async def send(self, type_url: str, names: Sequence[str] = (), node: bool = False) -> None:
        version, nonce = self.last.get(type_url, ("", ""))
        if node:
            await self.call.write(discovery_pb2.DiscoveryRequest(
                node=self.node, type_url=type_url, resource_names=names,
                version_info=version, response_nonce=nonce))
            return
        # The bytes protobuf (and Envoy) would write, fields in order, the names' encoding
        # made once per list: the thousand simulated ACKs of a change naming a thousand
        # clusters each cost the bench's CPU, which the server shares.
        await self.call.write(b"".join((
            field(1, version), self.fleet.names_block(names), field(4, type_url),
            field(5, nonce))))

    async def start(self) -> None:
        await self.send(CDS, node=True)

    async def on_response(self, type_url: str, version: str, nonce: str, raw: bytes,
                          now: float) -> None:
        self.last[type_url] = (version, nonce)
        if type_url == CDS:
            await self.send(CDS)
            clusters = self.fleet.cluster_names(version, raw)
            if clusters != self.clusters:  # like Envoy: EDS for the clusters now known
                self.clusters = clusters
                await self.send(EDS, clusters)
        elif type_url == EDS:
            if self.verify:
                self.changed_ports = self._changed_ports(raw) or self.changed_ports
            self.got_endpoints(version, now)
            self.fleet.ack_sent(self, version)
            await self.send(EDS, self.clusters)
            self.fleet.eds_acked.hit(self.index, now)
            if LDS not in self.requested:
                self.requested.add(LDS)
                await self.send(LDS)
        elif type_url == LDS:
            await self.send(LDS)
            if RDS not in self.requested:
                self.requested.add(RDS)
                await self.send(RDS, ROUTES)
        elif type_url == RDS:
            await self.send(RDS, ROUTES)
            self.fleet.configured.hit(self.index, now)

    @staticmethod
    def _changed_ports(raw: bytes) -> list[int] | None:
        for packed in discovery_pb2.DiscoveryResponse.FromString(raw).resources:
            assignment = endpoint_pb2.ClusterLoadAssignment.FromString(packed.value)
            if assignment.cluster_name == CHANGED_CLUSTER:
                return _ports(assignment)
        return None


class DeltaProxy(Proxy):
    """Incremental: subscribe by name (or wildcard), ACK = the response's nonce."""

    method = DELTA_METHOD

    async def send(self, type_url: str, subscribe: Sequence[str] = (),
                   unsubscribe: Sequence[str] = (), nonce: str = "", node: bool = False) -> None:
        if node or unsubscribe:
            await self.call.write(discovery_pb2.DeltaDiscoveryRequest(
                node=self.node if node else None, type_url=type_url,
                resource_names_subscribe=subscribe, resource_names_unsubscribe=unsubscribe,
                response_nonce=nonce))
            return
        # The bytes protobuf (and Envoy) would write, fields in order; a thousand names
        # encoded once per shared list (resource_names_subscribe is field 3, as SotW's
        # resource_names), not once per stream: the bench shares the server's CPUs.
        await self.call.write(b"".join((
            field(2, type_url), self.fleet.names_block(subscribe), field(6, nonce))))

    async def start(self) -> None:
        await self.send(CDS, node=True)  # no names on the first request: wildcard

    async def on_response(self, type_url: str, version: str, nonce: str, raw: bytes,
                          now: float) -> None:
        if type_url == CDS:
            await self.send(CDS, nonce=nonce)
            if not self.clusters:  # the first answer: every cluster of that version, as
                # in SotW (a list the streams of that version share: sorted, no repeats)
                added, removed = self.fleet.cluster_names(version, raw, delta=True), []
                self.clusters = added
            else:
                known = set(self.clusters)
                response = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
                added = sorted({r.name for r in response.resources} - known)
                removed = sorted(known & set(response.removed_resources))
                self.clusters = sorted((known | set(added)) - set(removed))
            if added or removed:
                await self.send(EDS, subscribe=added, unsubscribe=removed)
        elif type_url == EDS:
            if self.verify:
                self.changed_ports = self._changed_ports(raw) or self.changed_ports
            self.got_endpoints(version, now)
            self.fleet.ack_sent(self, version)
            await self.send(EDS, nonce=nonce)
            self.fleet.eds_acked.hit(self.index, now)
            if LDS not in self.requested:
                self.requested.add(LDS)
                await self.send(LDS)
        elif type_url == LDS:
            await self.send(LDS, nonce=nonce)
            if RDS not in self.requested:
                self.requested.add(RDS)
                await self.send(RDS, subscribe=[ROUTE_NAME])
        elif type_url == RDS:
            await self.send(RDS, nonce=nonce)
            self.fleet.configured.hit(self.index, now)

    @staticmethod
    def _changed_ports(raw: bytes) -> list[int] | None:
        for res in discovery_pb2.DeltaDiscoveryResponse.FromString(raw).resources:
            if res.name == CHANGED_CLUSTER:
                return _ports(endpoint_pb2.ClusterLoadAssignment.FromString(res.resource.value))
        return None


def make_node(node_id: str, service: int, zone: str) -> base_pb2.Node:
    node = base_pb2.Node(id=node_id, cluster=service_name(service))
    if zone:
        node.locality.zone = zone
    return node


class Fleet:
    """Simulated proxies over a few channels (one TCP connection per 50 streams), and the
    marks a scenario waits on. ``identities``: (service index, zone) per stream."""

    def __init__(self, address: str, identities: Sequence[tuple[int, str]], delta: bool,
                 prefix: str = "bench") -> None:
        self.address = address
        self.delta = delta
        self.identities = list(identities)
        self.channels = [grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
                         for _ in range(math.ceil(len(identities) / STREAMS_PER_CHANNEL))]
        kind = DeltaProxy if delta else SotwProxy
        self.proxies: list[Proxy] = [
            kind(i, make_node(f"{prefix}-{i:05d}", service, zone),
                 self.channels[i // STREAMS_PER_CHANNEL], self, verify=i == 0)
            for i, (service, zone) in enumerate(identities)]
        self.errors: dict[int, str] = {}
        self.closing = False
        self.eds_acked = Mark(self)
        self.configured = Mark(self)  # CDS, EDS, LDS and RDS all ACKed
        self.change: Mark | None = None
        self.baseline: dict[int, str] = {}
        self.last_message_at = time.perf_counter()
        self._cds_names: dict[str, list[str]] = {}
        self._blocks: dict[int, tuple[Sequence[str], bytes]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def open(self) -> None:
        self._tasks = [asyncio.create_task(p.run(), name=f"proxy-{p.index}")
                       for p in self.proxies]

    async def close(self) -> None:
        self.closing = True
        for task in self._tasks:
            task.cancel()
        for proxy in self.proxies:
            await proxy.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close()

    def cluster_names(self, version: str, raw: bytes, delta: bool = False) -> list[str]:
        """The cluster names of a SotW CDS response, or of a delta stream's first one
        (which holds every cluster of its version), decoded once per version: groups
        with equal clusters share it, as a type version is a hash of the content."""
        names = self._cds_names.get(version)
        if names is None:
            if delta:
                response = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
                names = sorted(r.name for r in response.resources)
            else:
                packed: Any = Packed.FromString(raw)
                names = sorted(Named.FromString(r.value).name for r in packed.resources)
            self._cds_names[version] = names
        return names

    def names_block(self, names: Sequence[str]) -> bytes:
        """``names`` as DiscoveryRequest's field 3, encoded once per list object (streams
        with the same clusters share the list: ``cluster_names``)."""
        if not names:
            return b""
        held = self._blocks.get(id(names))
        if held is None or held[0] is not names:
            held = self._blocks[id(names)] = (names, bytes(
                discovery_pb2.DiscoveryRequest(resource_names=names).SerializeToString()))
        return held[1]

    def failed(self, proxy: Proxy, error: str) -> None:
        self.errors[proxy.index] = error
        for mark in (self.eds_acked, self.configured, self.change):
            if mark is not None:
                mark.check()

    def check(self) -> None:
        if self.errors:
            index, error = next(iter(self.errors.items()))
            raise BenchError(f"{len(self.errors)} stream(s) failed; stream {index}: {error}")

    def eds_received(self, proxy: Proxy, version: str, now: float) -> None:
        if self.change is not None and version != self.baseline.get(proxy.index):
            self.change.hit(proxy.index, now, version)

    def ack_sent(self, proxy: Proxy, version: str) -> None:
        """A stream writes its EDS ACK now: during a change, when (wall clock, as the
        server's convergence clock), the first time it ACKs a version it did not hold.
        Taken as the write starts: the end of an awaited write is seen only when this
        loop, busy with a thousand streams, gets back to it."""
        if self.change is not None and version != self.baseline.get(proxy.index):
            self.change.acked.setdefault(proxy.index, time.time())

    def begin_change(self, expected: Iterable[int] | None = None) -> Mark:
        """From now on, a stream's EDS response with a version other than the one it
        holds counts as the change reaching it."""
        self.baseline = {p.index: p.eds_version for p in self.proxies}
        self.change = Mark(self, expected)
        return self.change

    def end_change(self) -> None:
        self.change = None

    async def quiet(self, seconds: float, timeout: float) -> None:
        """Wait until no stream has received anything for ``seconds``."""
        limit = time.perf_counter() + timeout
        while time.perf_counter() - self.last_message_at < seconds:
            if time.perf_counter() > limit:
                raise BenchError(f"the server kept pushing for {timeout:.0f} s")
            await asyncio.sleep(0.05)
