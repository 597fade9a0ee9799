"""Incremental (delta) xDS on one stream: requests and snapshots in, pushes out.

The rules (Envoy's xDS protocol document, and shared/XDS-PITFALLS.md):
- Subscription changes count even on a request with a stale nonce; ACK and NACK only
  for the latest nonce. A NACK is recorded; the rejected resources are not sent again.
- ``initial_resource_versions`` on a (re)connect says what the client holds: only what
  differs is sent, and what was deleted meanwhile goes out in ``removed_resources``.
- A name asked for that does not exist is answered in ``removed_resources``, so Envoy
  stops waiting for it; when it appears later it is sent.
- A name subscribed again after an unsubscribe is sent even if unchanged.
- An empty first subscription means wildcard (legacy); ``*`` subscribes to all
  explicitly and may be mixed with names.
- The first request of a type from a client that holds nothing is answered, if need be
  with an empty response (a reconnecting client that is up to date is not).
- A name subscribed again while subscribed is answered again: that is how Envoy asks
  on demand (a virtual host, a cluster) and it waits for the answer.
- Clusters go before endpoints, listeners before routes; clusters are removed only at
  the end of a push, after the routes that used them, and an updated cluster gets its
  endpoints again (Envoy finishes warming it only on an EDS response).
- A wildcard subscription gets ``TypeSnapshot.wildcard`` (every resource when None);
  names asked for explicitly may be any resource. On-demand sidecars get only their own
  clusters by wildcard and fetch the others by name.
- Virtual hosts (VHDS) are asked for by alias, ``<route config>/<Host header>``; the
  answer is the virtual host that serves that Host with the alias in its ``aliases``
  (Envoy resumes the held request only when it sees the alias it asked for), or, for a
  Host nobody serves, an entry with the alias and no resource: Envoy then answers 404
  at once instead of waiting. A fetched virtual host stays subscribed: its updates and
  its removal reach the sidecar.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane import resource
from controlplane.cache.snapshot import Resource, Snapshot, TypeSnapshot
from controlplane.proxy import ProxyIdentity
from controlplane.server.limits import MAX_ERROR_CHARS, Limits
from controlplane.server.stream import Handled, Nack, Push, StreamBase, TypeState

_NO_TARGETS: frozenset[str] = frozenset()


@dataclass(slots=True)
class DeltaTypeState(TypeState):
    client: dict[str, str] = field(default_factory=dict)  # what the client holds: name -> version
    told_absent: set[str] = field(default_factory=set)
    base: TypeSnapshot | None = None  # the snapshot the client was last brought up to date with
    # Resources named through an alias the client subscribed to (VHDS), as of ``base``.
    targets: frozenset[str] = _NO_TARGETS
    owed: bool = False  # a first request from a client that holds nothing: answer it


class DeltaStream(StreamBase):
    protocol = "delta"

    def __init__(
        self, stream_id: int, api: str, fixed_type: str | None = None, identifier: str = "",
        limits: Limits | None = None,
    ) -> None:
        super().__init__(stream_id, api, fixed_type, identifier, limits)
        self.types: dict[str, DeltaTypeState] = {}

    def accept_node(self, node: base_pb2.Node | None, has_node: bool) -> bool:
        """As for any stream, and a delta stream may be on demand (node metadata)."""
        new = super().accept_node(node, has_node)
        if new and node is not None:
            self.proxy = ProxyIdentity.from_node(node, delta=True)
        return new

    def type_states(self) -> dict[str, TypeState]:
        return dict(self.types)

    def on_request(self, request: discovery_pb2.DeltaDiscoveryRequest) -> Handled:
        type_url = self.begin(request)
        if type_url is None:
            return Handled("unknown_type", request.type_url)
        state = self.types.get(type_url)
        first = state is None
        if state is None:
            state = self.types[type_url] = DeltaTypeState()
            state.client = {_intern(n): v for n, v in request.initial_resource_versions.items()}
            state.owed = not state.client
            if not request.resource_names_subscribe:
                state.wildcard = True  # legacy wildcard

        kind, error = ("initial" if first else "subscribe"), ""
        if not first and request.response_nonce:
            if request.response_nonce != state.nonce:
                kind = "stale"
            elif request.HasField("error_detail"):
                kind, error = "nack", request.error_detail.message[:MAX_ERROR_CHARS]
                state.last_nack = Nack(error, state.sent_version, request.response_nonce,
                                       time.time())
                state.nacked_version = state.sent_version
            else:
                kind = "ack"
                state.acked_version = state.sent_version

        typed = self._typed(type_url) if self.snapshot is not None else None
        was_wildcard = state.wildcard
        for name in request.resource_names_subscribe:
            if name == "*":
                state.wildcard = True
                continue
            if not first:  # asked again, subscribed or not: answer it even if unchanged
                state.client.pop(name, None)
                if typed is not None and (target := typed.aliases.get(name)) is not None:
                    state.client.pop(target, None)
            state.names.add(_intern(name))
            state.told_absent.discard(name)
        for name in request.resource_names_unsubscribe:
            if name == "*":
                state.wildcard = False
                continue
            state.names.discard(name)
            state.client.pop(name, None)
            state.told_absent.discard(name)
        if was_wildcard and not state.wildcard:  # the client drops what it no longer wants
            state.client = {n: v for n, v in state.client.items() if n in state.names}

        handled = Handled(kind, type_url, error=error)
        if typed is not None:
            # Only the names this request touched can need an answer, unless the stream
            # is new to this snapshot or just turned to wildcard: then look at everything.
            everything = state.base is None or (state.wildcard and not was_wildcard)
            touched = {*request.resource_names_subscribe, *request.resource_names_unsubscribe}
            touched.discard("*")
            if not everything and not touched and not state.owed:
                return handled  # a plain ACK or NACK
            old_targets = state.targets
            state.targets = _targets(typed, state.names)
            if not everything:
                touched |= state.targets ^ old_targets
                touched |= _targets(typed, touched)
            updated, removed, unresolved = self._changes(
                typed, state, None if everything else touched)
            state.base = typed
            push = self._emit(type_url, state, typed, updated, removed, unresolved)
            if push is not None:
                handled.pushes.append(push)
        return handled

    def on_snapshot(self, snapshot: Snapshot) -> list[Push]:
        had_config = self.snapshot is not None
        self.snapshot = snapshot
        pushes: list[Push] = []
        tail: list[Push] = []
        rewarm: set[str] = set()
        for type_url in resource.PUSH_ORDER:
            state = self.types.get(type_url)
            if state is None:
                continue
            typed = self._typed(type_url)
            candidates = None if state.base is None else set(typed.changed_since(state.base))
            old_targets = state.targets
            state.targets = _targets(typed, state.names)
            if candidates is not None:
                candidates |= state.targets ^ old_targets
            if type_url == resource.ENDPOINT and rewarm:
                for name in rewarm:
                    state.client.pop(name, None)
                if candidates is not None:
                    candidates |= rewarm
            updated, removed, unresolved = self._changes(typed, state, candidates)
            state.base = typed
            if had_config and type_url in (resource.CLUSTER, resource.ENDPOINT):
                push = self._emit(type_url, state, typed, updated, [], unresolved)
                removal = self._emit(type_url, state, typed, [], removed, [])
                if removal is not None:
                    tail.append(removal)
            else:
                push = self._emit(type_url, state, typed, updated, removed, unresolved)
            if push is not None:
                pushes.append(push)
            if type_url == resource.CLUSTER:
                for cluster in updated:
                    rewarm |= cluster.refs.get(resource.ENDPOINT, frozenset())
        return pushes + tail

    def _typed(self, type_url: str) -> TypeSnapshot:
        assert self.snapshot is not None
        return self.snapshot.get(type_url) or TypeSnapshot(type_url, "", {})

    def _vhds_namespaces(self) -> list[str]:
        """``<route configuration>/`` for each route configuration sent that takes its
        virtual hosts from VHDS. Envoy's VHDS holds its listener back until an answer
        names something in that namespace (an answer with nothing is not delivered to
        it), so a first answer with no virtual host removes this name, which is none."""
        routes = self.snapshot.get(resource.ROUTE) if self.snapshot is not None else None
        if routes is None:
            return []
        return sorted(f"{name}/" for name, res in routes.resources.items()
                      if isinstance(res.message, route_pb2.RouteConfiguration)
                      and res.message.HasField("vhds"))

    @staticmethod
    def _changes(typed: TypeSnapshot, state: DeltaTypeState, candidates: set[str] | None
                 ) -> tuple[list[Resource], list[str], list[str]]:
        """What to send, what to remove, and which aliases nothing answers, looking only
        at ``candidates`` (the names changed since the stream's base) or, when None, at
        everything."""
        res = typed.resources
        wildcard = typed.wildcard
        if candidates is None:
            names = set(state.client) | state.names | state.targets
            if state.wildcard:
                names |= set(res) if wildcard is None else wildcard
        else:
            names = candidates

        def in_scope(name: str) -> bool:
            if name not in res:
                return False
            if name in state.names or name in state.targets:
                return True
            return state.wildcard and (wildcard is None or name in wildcard)

        ordered = sorted(names)
        updated = [res[n] for n in ordered if in_scope(n) and state.client.get(n) != res[n].version]
        removed = [n for n in ordered if n in state.client and not in_scope(n)]
        absent = [n for n in ordered if n in state.names and n not in res
                  and n not in state.client and n not in state.told_absent]
        if typed.type_url != resource.VIRTUAL_HOST:
            return updated, removed + absent, []
        # A Host Envoy asked for: answered by its virtual host (sent above, with the alias)
        # or, when nothing serves it, by the alias alone, so the held request gets a 404.
        unresolved = [n for n in absent if n in typed.aliases or "/" in n]
        return updated, removed + [n for n in absent if n not in unresolved], [
            n for n in unresolved if n not in typed.aliases]

    def _emit(self, type_url: str, state: DeltaTypeState, typed: TypeSnapshot,
              updated: list[Resource], removed: list[str], unresolved: list[str]
              ) -> Push | None:
        """The response, or None when there is nothing to say, except that the first
        request of a client that holds nothing is answered, even with nothing: Envoy
        waits for that answer before it calls itself initialized (an on-demand sidecar
        without an inbound port has no cluster of its own to be sent)."""
        if not updated and not removed and not unresolved:
            if not state.owed:
                return None
            if type_url == resource.VIRTUAL_HOST:
                removed = self._vhds_namespaces()
        state.owed = False
        version = typed.version
        nonce = self.next_nonce()
        header = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version, type_url=type_url, nonce=nonce,
            removed_resources=removed, control_plane=self._control_plane,
        ).SerializeToString()
        if typed.aliases and state.names:
            chunks = _with_aliases(updated, typed.aliases, state.names)
        else:
            chunks = [r.delta_chunk for r in updated]
        if unresolved:
            chunks.append(_unresolved(unresolved))
        payload = header + b"".join(chunks)
        for r in updated:
            state.client[r.name] = r.version
        for name in [*removed, *unresolved]:
            state.client.pop(name, None)
            if name in state.names:
                state.told_absent.add(name)
        state.nonce, state.sent_version = nonce, version
        state.pushes += 1
        return Push(type_url, nonce, version, payload, [r.name for r in updated],
                    [*removed, *unresolved])


def _intern(name: str) -> str:
    """One string object per name across streams: a thousand sidecars subscribing to
    the same thousand names would otherwise hold a thousand copies of each."""
    return sys.intern(name)


def _targets(typed: TypeSnapshot, names: Iterable[str]) -> frozenset[str]:
    """The resources the subscribed aliases resolve to (none for types without aliases)."""
    aliases = typed.aliases
    if not aliases:
        return _NO_TARGETS
    return frozenset(target for n in names if (target := aliases.get(n)) is not None)


# Field numbers (envoy/service/discovery/v3/discovery.proto): DeltaDiscoveryResponse
# ``resources`` = 2, Resource ``aliases`` = 4.
_RESOURCES_TAG = b"\x12"


def _with_aliases(updated: list[Resource], aliases: Mapping[str, str],
                  names: set[str]) -> list[bytes]:
    """Each resource's prepared chunk, with the subscribed aliases that name it added to
    its ``aliases`` (protobuf merges repeated fields, so appending them to the encoded
    Resource is the same as encoding it with them)."""
    wanted: dict[str, list[str]] = {}
    for name in sorted(names):
        target = aliases.get(name)
        if target is not None:
            wanted.setdefault(target, []).append(name)
    chunks = []
    for r in updated:
        extra = wanted.get(r.name)
        if not extra:
            chunks.append(r.delta_chunk)
            continue
        body = _body(r.delta_chunk) + discovery_pb2.Resource(aliases=extra).SerializeToString()
        chunks.append(_RESOURCES_TAG + _varint(len(body)) + body)
    return chunks


def _unresolved(aliases: list[str]) -> bytes:
    """Entries for Hosts nothing serves: the alias as the name and the only alias, and no
    resource (what Envoy's VHDS takes as "cannot resolve")."""
    response = discovery_pb2.DeltaDiscoveryResponse(resources=[
        discovery_pb2.Resource(name=alias, aliases=[alias]) for alias in aliases
    ])
    return bytes(response.SerializeToString())


def _body(chunk: bytes) -> bytes:
    """The encoded Resource inside a prepared ``resources`` field."""
    assert chunk[:1] == _RESOURCES_TAG
    position, shift, length = 1, 0, 0
    while True:
        byte = chunk[position]
        length |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            break
        shift += 7
    return chunk[position:position + length]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
