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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from controlplane import resource
from controlplane.cache.snapshot import Resource, Snapshot, TypeSnapshot, type_version
from controlplane.server.limits import MAX_ERROR_CHARS, MAX_VERSION_CHARS, Limits
from controlplane.server.stream import Handled, Nack, Push, StreamBase, TypeState


@dataclass(slots=True)
class SotwTypeState(TypeState):
    requested: bool = False
    legacy_wildcard: bool = False
    base: TypeSnapshot | None = None  # what the client was last brought up to date with
    sent: dict[str, str] = field(default_factory=dict)  # full-state types: the set last sent


class SotwStream(StreamBase):
    protocol = "sotw"

    def __init__(
        self, stream_id: int, api: str, fixed_type: str | None = None, identifier: str = "",
        limits: Limits | None = None,
    ) -> None:
        super().__init__(stream_id, api, fixed_type, identifier, limits)
        self.types: dict[str, SotwTypeState] = {}

    def type_states(self) -> dict[str, TypeState]:
        return dict(self.types)

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> Handled:
        type_url = self.begin(request)
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

        before = state.names  # rebound, never mutated, by _update_subscription
        added = _update_subscription(state, list(request.resource_names), first)
        state.requested = True
        handled = Handled(kind, type_url, error=error)
        if self.snapshot is not None and (first or added):
            typed = self._typed(type_url)
            if first or type_url in resource.FULL_STATE or state.wildcard:
                selected = self._scope(typed, state)
            else:
                fresh = sorted(state.names - before)
                selected = [typed.resources[n] for n in fresh if n in typed.resources]
            handled.pushes.append(self._emit(type_url, state, typed, selected))
        return handled

    def on_snapshot(self, snapshot: Snapshot) -> list[Push]:
        previous, self.snapshot = self.snapshot, snapshot
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
                    held = self._held_clusters(previous, state, selected)
                    if held:
                        union = selected + held
                        pushes.append(self._emit(type_url, state, typed, union,
                                                 version=type_version(union)))
                        tail.append(self._defer(type_url, typed.version, selected))
                        continue
                pushes.append(self._emit(type_url, state, typed, selected))
                continue
            wanted = changed if state.wildcard else changed & state.names
            if type_url == resource.ENDPOINT and rewarm:
                wanted = wanted | (rewarm if state.wildcard else rewarm & state.names)
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
        """Every resource the stream subscribes to that exists."""
        if state.wildcard:
            return list(typed.resources.values())
        found = (typed.resources.get(name) for name in sorted(state.names))
        return [r for r in found if r is not None]

    def _held_clusters(
        self, previous: Snapshot | None, state: SotwTypeState, selected: list[Resource]
    ) -> list[Resource]:
        """Clusters leaving the set that listeners or routes on this stream still use."""
        if previous is None or not ({resource.LISTENER, resource.ROUTE} & self.types.keys()):
            return []
        keep = {r.name for r in selected}
        old = previous.get(resource.CLUSTER)
        if old is None:
            return []
        gone = sorted(n for n in state.sent if n not in keep)
        return [old.resources[n] for n in gone if n in old.resources]

    def _emit(self, type_url: str, state: SotwTypeState, typed: TypeSnapshot,
              selected: list[Resource], version: str | None = None) -> Push:
        nonce = self.next_nonce()
        version = typed.version if version is None else version
        header = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=nonce,
            control_plane=self._control_plane,
        ).SerializeToString()
        payload = header + b"".join(r.sotw_chunk for r in selected)
        state.nonce, state.sent_version, state.base = nonce, version, typed
        if type_url in resource.FULL_STATE:
            state.sent = {r.name: r.version for r in selected}
        state.pushes += 1
        return Push(type_url, nonce, version, payload, [r.name for r in selected])

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
    requested = set(names)
    wildcard = "*" in requested
    requested.discard("*")
    if first and not names:
        state.legacy_wildcard = True
    if state.legacy_wildcard and not names:
        wildcard = True
    elif names:
        state.legacy_wildcard = False
    added = (wildcard and not state.wildcard) or bool(requested - state.names)
    state.wildcard = wildcard
    if requested != state.names:  # an ACK repeats the names: keep the set already held
        state.names = requested
    return added
