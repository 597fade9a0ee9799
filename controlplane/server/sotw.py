"""State-of-the-world xDS on one stream: requests and snapshots in, pushes out.

The rules (Envoy's xDS protocol document, and shared/XDS-PITFALLS.md):
- A request whose response_nonce is not the last one sent for its type is stale: ignored.
- A request with error_detail is a NACK: recorded, and the rejected version is not sent
  again; the next push happens when the snapshot changes.
- An ACK of the current version gets no answer (answering would make a hot loop).
- A newly requested name is answered at once, even when nothing changed.
- An empty name list on the first request means "all" (wildcard) until names are given.
- Pushes follow the ADS order; endpoints are re-sent after every cluster push (Envoy
  ends cluster warming only on an EDS response after the CDS update); clusters that
  disappear stay until the listeners and routes that point at them have been replaced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane import resource
from controlplane.cache.snapshot import Resource, Snapshot, type_version
from controlplane.server.stream import Nack, Push, StreamBase, TypeState


@dataclass(slots=True)
class SotwTypeState(TypeState):
    requested: bool = False
    legacy_wildcard: bool = False
    sent: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Handled:
    """What a request turned out to be, and what to answer."""

    kind: str  # initial | ack | nack | stale | unknown_type
    type_url: str
    pushes: list[Push] = field(default_factory=list)
    error: str = ""


class SotwStream(StreamBase):
    protocol = "sotw"

    def __init__(
        self, stream_id: int, api: str, fixed_type: str | None = None, identifier: str = ""
    ) -> None:
        super().__init__(stream_id, api, fixed_type)
        self.types: dict[str, SotwTypeState] = {}
        self._control_plane = base_pb2.ControlPlane(identifier=identifier)

    def type_states(self) -> dict[str, TypeState]:
        return dict(self.types)

    def on_request(self, request: discovery_pb2.DiscoveryRequest) -> Handled:
        self.accept_node(request.node, request.HasField("node"))
        type_url = self.resolve_type(request.type_url)
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
            kind, error = "nack", request.error_detail.message
            state.last_nack = Nack(error, state.sent_version, request.response_nonce, time.time())
            state.nacked_version = state.sent_version
        elif not first:
            kind = "ack"
            state.acked_version = request.version_info

        added = _update_subscription(state, list(request.resource_names), first)
        state.requested = True
        handled = Handled(kind, type_url, error=error)
        if self.snapshot is not None and (first or added):
            handled.pushes.append(self._emit(type_url, state, *self._select(type_url, state)))
        return handled

    def on_snapshot(self, snapshot: Snapshot) -> list[Push]:
        previous, self.snapshot = self.snapshot, snapshot
        pushes: list[Push] = []
        tail: list[Push] = []
        clusters_pushed = False
        for type_url in resource.PUSH_ORDER:
            state = self.types.get(type_url)
            if state is None or not state.requested:
                continue
            version, selected = self._select(type_url, state)
            changed = {r.name: r.version for r in selected} != state.sent
            force = not state.nonce or (type_url == resource.ENDPOINT and clusters_pushed)
            if not (changed or force):
                continue
            if type_url == resource.CLUSTER and previous is not None:
                held = self._held_clusters(previous, state, selected)
                if held:
                    union = selected + held
                    pushes.append(self._emit(type_url, state, type_version(union), union))
                    tail.append(self._defer(type_url, version, selected))
                    clusters_pushed = True
                    continue
            pushes.append(self._emit(type_url, state, version, selected))
            clusters_pushed = clusters_pushed or type_url == resource.CLUSTER
        return pushes + [self._finish(p) for p in tail]

    def _select(self, type_url: str, state: SotwTypeState) -> tuple[str, list[Resource]]:
        assert self.snapshot is not None
        typed = self.snapshot.get(type_url)
        if typed is None:
            return "", []
        if state.wildcard:
            return typed.version, list(typed.resources.values())
        found = (typed.resources.get(name) for name in sorted(state.names))
        return typed.version, [r for r in found if r is not None]

    def _held_clusters(
        self, previous: Snapshot, state: SotwTypeState, selected: list[Resource]
    ) -> list[Resource]:
        """Clusters leaving the set that listeners or routes on this stream still use."""
        if not ({resource.LISTENER, resource.ROUTE} & self.types.keys()):
            return []
        keep = {r.name for r in selected}
        old = previous.get(resource.CLUSTER)
        if old is None:
            return []
        gone = sorted(n for n in state.sent if n not in keep)
        return [old.resources[n] for n in gone if n in old.resources]

    def _emit(self, type_url: str, state: SotwTypeState, version: str,
              selected: list[Resource]) -> Push:
        nonce = self.next_nonce()
        header = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=type_url, nonce=nonce,
            control_plane=self._control_plane,
        ).SerializeToString()
        payload = header + b"".join(r.sotw_chunk for r in selected)
        state.nonce, state.sent_version = nonce, version
        state.sent = {r.name: r.version for r in selected}
        state.pushes += 1
        return Push(type_url, nonce, version, payload, [r.name for r in selected])

    def _defer(self, type_url: str, version: str, selected: list[Resource]) -> Push:
        """A placeholder for the final push of a make-before-break pair."""
        return Push(type_url, "", version, b"", [r.name for r in selected])

    def _finish(self, deferred: Push) -> Push:
        state = self.types[deferred.type_url]
        assert self.snapshot is not None
        typed = self.snapshot.get(deferred.type_url)
        resources = typed.resources if typed else {}
        selected = [resources[n] for n in deferred.names if n in resources]
        return self._emit(deferred.type_url, state, deferred.version, selected)


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
    state.wildcard, state.names = wildcard, requested
    return added
