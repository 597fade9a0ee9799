"""State-of-the-world xDS on one stream: requests and snapshots in, pushes out.

The rules (Envoy's xDS protocol document, and shared/XDS-PITFALLS.md):
- A request whose response_nonce is not the last one sent for its type is stale: ignored.
- A request with error_detail is a NACK: recorded, and the rejected version is not sent
  again; the next push happens when the snapshot changes.
- An ACK of the current version gets no answer (answering would make a hot loop).
- A newly requested name is answered at once, even when nothing changed.
- An empty name list on the first request means "all" (wildcard) until names are given.
- Listeners and clusters are sent whole (a missing one is deleted); endpoints and
  routes only where they changed or were newly asked for (a partial response leaves the
  others as they are), so a one-endpoint change sends one ClusterLoadAssignment.
- Pushes follow the ADS order; a changed cluster's endpoints are sent again after it
  (Envoy ends cluster warming only on an EDS response after the CDS update); clusters
  that disappear stay until the listeners and routes that point at them are replaced.

At a thousand streams (shared/XDS-PITFALLS.md 16, 17):
- An ACK of the last push that repeats the names of the stream's last request is
  recognized from its bytes, without parsing it (``quick_ack``); other requests are
  read without parsing their names, which are compared as bytes with the last
  request's (requests.py). So an EDS ACK naming a thousand clusters makes no string,
  builds no set, hashes nothing and checks no name again.
- Streams that subscribe to the same names share one frozenset (``NameSets``), and the
  record of a full-state type last sent is the snapshot's own mapping when the whole
  type went out.
- A push holds the resources' prepared chunks; they are joined only when it is written.
"""


from __future__ import annotations

import time
import weakref
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from controlplane import resource
from controlplane.cache.snapshot import Resource, Snapshot, TypeSnapshot, type_version
from controlplane.server.limits import (
    MAX_ERROR_CHARS,
    MAX_VERSION_CHARS,
    Limits,
    check_names,
)
from controlplane.server.requests import (
    NAME_KEYS,
    NamesKey,
    names_key,
    names_of,
    read_request,
)
from controlplane.server.stream import (
    Handled,
    Nack,
    Push,
    StreamBase,
    TypeState,
    length_delimited,
)

_NONE: frozenset[str] = frozenset()
_STAR = frozenset({"*"})
_NOTHING_SENT: Mapping[str, Resource] = MappingProxyType({})
# A response's encoded fields 1 (version_info) and 4 (type_url), by their text.
_VERSION_FIELDS: dict[str, bytes] = {}
_TYPE_FIELDS: dict[str, bytes] = {}


class NameSets:
    """One frozenset per distinct subscription, shared by every stream that holds it: a
    thousand sidecars asking for the same thousand endpoints keep one set between them.
    A set no stream holds any more is dropped (weak references)."""

    def __init__(self) -> None:
        self._sets: weakref.WeakValueDictionary[int, frozenset[str]] = (
            weakref.WeakValueDictionary())

    def intern(self, names: frozenset[str]) -> frozenset[str]:
        if not names:
            return _NONE
        key = hash(names)
        held = self._sets.get(key)
        if held is None:
            self._sets[key] = names
            return names
        return held if held == names else names  # a hash collision: not shared

    def __len__(self) -> int:
        return len(self._sets)


NAME_SETS = NameSets()


@dataclass(slots=True)
class SotwTypeState(TypeState):
    requested: bool = False
    legacy_wildcard: bool = False
    base: TypeSnapshot | None = None  # what the client was last brought up to date with
    subscribed: frozenset[str] = _NONE  # the names asked for, shared (NAME_SETS)
    last_key: NamesKey | None = None  # the last request's names_key, shared (NAME_KEYS)
    names_at: int = -1  # where the names start in ``last_key`` (-1: not known)
    ack_head: bytes = b""  # an ACK of the last push: field 1 (the version sent) ...
    ack_tail: bytes = b""  # ... the names, then fields 4 (type) and 5 (the nonce sent)
    # Full-state types: what was last sent (the snapshot's own mapping when it all went).
    sent: Mapping[str, Resource] = field(default_factory=lambda: _NOTHING_SENT)

    def subscription(self) -> Set[str]:
        return self.subscribed


class SotwStream(StreamBase):
    protocol = "sotw"

    def __init__(
        self, stream_id: int, api: str, fixed_type: str | None = None, identifier: str = "",
        limits: Limits | None = None,
    ) -> None:
        super().__init__(stream_id, api, fixed_type, identifier, limits)
        self.types: dict[str, SotwTypeState] = {}
        self._trailer: bytes | None = None  # the encoded control_plane field

    def type_states(self) -> dict[str, TypeState]:
        return dict(self.types)

    def on_request(self, request: Any) -> Handled:
        """Take a request: its bytes as received, a DiscoveryRequest or a SotwRequest
        (requests.py); a message's version, nonce and node are cleared once read."""
        if isinstance(request, bytes):
            quick = self.quick_ack(request)
            if quick is not None:
                return Handled("ack", quick)
            request = read_request(request)
        type_url = self.prepare(request)
        if type_url is None:
            return Handled("unknown_type", request.type_url)
        state = self.types.get(type_url)
        first = state is None
        if state is None:
            state = self.types[type_url] = SotwTypeState()
        elif request.response_nonce != state.nonce:
            return Handled("stale", type_url)

        kind, error = "initial", ""
        if not first and request.HasField("error_detail"):
            kind, error = "nack", request.error_detail.message[:MAX_ERROR_CHARS]
            state.last_nack = Nack(error, state.sent_version, request.response_nonce, time.time())
            state.nacked_version = state.sent_version
        elif not first:
            kind = "ack"
            state.acked_version = request.version_info[:MAX_VERSION_CHARS]

        before = state.subscribed
        key = names_key(request)
        last = state.last_key
        added = False  # the names of the last request again (every ACK): nothing to redo
        if last is None or key != last.key:
            names = names_of(key)
            check_names(names, self.limits)
            added = _update_subscription(state, names, first)
            state.last_key = NAME_KEYS.intern(key)
            # The key is the type (field 4), then the names as the client encoded them
            # (unknown fields come last), unless the request said more (an error).
            typed_field = length_delimited(4, request.type_url.encode())
            state.names_at = (len(typed_field) if not request.HasField("error_detail")
                              and key.startswith(typed_field) else -1)
        state.requested = True
        handled = Handled(kind, type_url, error=error)
        if self.snapshot is not None and (first or added):
            typed = self._typed(type_url)
            if first or type_url in resource.FULL_STATE or state.wildcard:
                selected = self._scope(typed, state)
            else:
                fresh = sorted(state.subscribed - before)
                selected = [typed.resources[n] for n in fresh if n in typed.resources]
            handled.pushes.append(self._emit(type_url, state, typed, selected))
        return handled

    def quick_ack(self, data: Any) -> str | None:
        """The request's type if it is, byte for byte, an ACK of the last push of its type
        with the names of the last request (nothing to answer); None for anything else."""
        if self.node is None or not isinstance(data, bytes):
            return None
        for type_url, state in self.types.items():
            tail = state.ack_tail
            if not tail or not data.endswith(tail):
                continue
            last, start, head = state.last_key, state.names_at, state.ack_head
            if (last is not None and start >= 0
                    and len(data) == len(head) + len(last.key) - start + len(tail)
                    and data.startswith(head)
                    and data.startswith(memoryview(last.key)[start:], len(head))):
                state.acked_version = state.sent_version
                return type_url
            return None
        return None

    def on_snapshot(self, snapshot: Snapshot) -> list[Push]:
        self.snapshot = snapshot
        pushes: list[Push] = []
        tail: list[Push] = []
        rewarm: set[str] = set()
        for type_url in resource.PUSH_ORDER:
            state = self.types.get(type_url)
            if state is None or not state.requested:
                continue
            typed = self._typed(type_url)
            if not state.nonce:  # the first request was waiting for a snapshot
                pushes.append(self._emit(type_url, state, typed, self._scope(typed, state)))
                continue
            changed = typed.changed_since(state.base)
            if type_url in resource.FULL_STATE:
                if typed.version == state.sent_version or not changed:
                    state.base = typed
                    continue
                selected = self._scope(typed, state)
                if type_url == resource.CLUSTER:
                    rewarm = _endpoints_of(typed, changed)
                    held = self._held_clusters(state, typed, selected)
                    if held:
                        union = selected + held
                        pushes.append(self._emit(type_url, state, typed, union,
                                                 version=type_version(union)))
                        tail.append(self._defer(type_url, typed.version, selected))
                        continue
                pushes.append(self._emit(type_url, state, typed, selected))
                continue
            wanted = changed if state.wildcard else changed & state.subscribed
            if type_url == resource.ENDPOINT and rewarm:
                wanted = wanted | (rewarm if state.wildcard else rewarm & state.subscribed)
            state.base = typed
            selected = [typed.resources[n] for n in sorted(wanted) if n in typed.resources]
            if selected:
                pushes.append(self._emit(type_url, state, typed, selected))
        return pushes + [self._finish(p) for p in tail]

    def _typed(self, type_url: str) -> TypeSnapshot:
        assert self.snapshot is not None
        return self.snapshot.get(type_url) or TypeSnapshot(type_url, "", {})

    @staticmethod
    def _scope(typed: TypeSnapshot, state: SotwTypeState) -> list[Resource]:
        """Every resource the stream subscribes to that exists. (A wildcard gets every
        resource of the group: ``TypeSnapshot.wildcard`` narrows delta streams only, as
        on-demand discovery needs delta.)"""
        res = typed.resources
        if state.wildcard:
            return list(res.values())
        names = state.subscribed
        if 2 * len(names) >= len(res):  # most of them (EDS): one pass, no lookup per name
            return [r for r in res.values() if r.name in names]
        found = (res.get(name) for name in names)
        return [r for r in found if r is not None]

    def _held_clusters(self, state: SotwTypeState, typed: TypeSnapshot,
                       selected: list[Resource]) -> list[Resource]:
        """Clusters leaving the set that listeners or routes on this stream still use."""
        if not ({resource.LISTENER, resource.ROUTE} & self.types.keys()):
            return []
        keep: Mapping[str, Any] | set[str] = (
            typed.resources if len(selected) == len(typed.resources)
            else {r.name for r in selected})
        gone = [r for name, r in state.sent.items() if name not in keep]
        return sorted(gone, key=lambda r: r.name)

    def _emit(self, type_url: str, state: SotwTypeState, typed: TypeSnapshot,
              selected: list[Resource], version: str | None = None) -> Push:
        # ``selected`` comes from ``typed`` without repeats unless a version is given.
        whole = version is None and len(selected) == len(typed.resources)
        nonce = self.next_nonce()
        version = typed.version if version is None else version
        head, tail, header = self._header_parts(version, type_url, nonce)
        body = [r.sotw_chunk for r in selected]
        state.nonce, state.sent_version, state.base = nonce, version, typed
        state.ack_head, state.ack_tail = head, tail
        if type_url in resource.FULL_STATE:
            state.sent = typed.resources if whole else {r.name: r for r in selected}
        state.pushes += 1
        return Push(type_url, nonce, version, header, [r.name for r in selected],
                    body=body, body_bytes=sum(map(len, body)))

    def _header(self, version: str, type_url: str, nonce: str) -> bytes:
        return self._header_parts(version, type_url, nonce)[2]

    def _header_parts(self, version: str, type_url: str,
                      nonce: str) -> tuple[bytes, bytes, bytes]:
        """The DiscoveryResponse around the resources, encoded by hand (a message made
        and serialized per push was a tenth of the server's CPU per change): fields 1
        (version_info), 4 (type_url), 5 (nonce) and 6 (control_plane). Returns what an
        ACK of it starts with (field 1) and ends with (4 and 5), and the header."""
        if self._trailer is None:
            self._trailer = length_delimited(6, self._control_plane.SerializeToString())
        head = _VERSION_FIELDS.get(version)
        if head is None:  # one per version: the streams of a change share it
            if len(_VERSION_FIELDS) >= 64:
                _VERSION_FIELDS.clear()
            head = _VERSION_FIELDS[version] = length_delimited(1, version.encode())
        typed = _TYPE_FIELDS.get(type_url)
        if typed is None:
            typed = _TYPE_FIELDS[type_url] = length_delimited(4, type_url.encode())
        tail = typed + length_delimited(5, nonce.encode())
        return head, tail, head + tail + self._trailer

    def _defer(self, type_url: str, version: str, selected: list[Resource]) -> Push:
        """A placeholder for the final push of a make-before-break pair."""
        return Push(type_url, "", version, b"", [r.name for r in selected])

    def _finish(self, deferred: Push) -> Push:
        state = self.types[deferred.type_url]
        typed = self._typed(deferred.type_url)
        selected = [typed.resources[n] for n in deferred.names if n in typed.resources]
        return self._emit(deferred.type_url, state, typed, selected)


def _endpoints_of(clusters: TypeSnapshot, names: frozenset[str]) -> set[str]:
    """The ClusterLoadAssignments that changed clusters wait for to finish warming."""
    wanted: set[str] = set()
    for name in names:
        cluster = clusters.resources.get(name)
        if cluster is not None:
            wanted |= cluster.refs.get(resource.ENDPOINT, frozenset())
    return wanted


def _update_subscription(state: SotwTypeState, names: list[str], first: bool) -> bool:
    """Apply the request's name list; True if something is newly requested."""
    requested = frozenset(names)
    wildcard = "*" in requested
    if wildcard:
        requested = requested - _STAR
    if first and not names:
        state.legacy_wildcard = True
    if state.legacy_wildcard and not names:
        wildcard = True
    elif names:
        state.legacy_wildcard = False
    added = (wildcard and not state.wildcard) or not requested <= state.subscribed
    state.wildcard = wildcard
    if requested != state.subscribed:
        state.subscribed = NAME_SETS.intern(requested)
    return added
