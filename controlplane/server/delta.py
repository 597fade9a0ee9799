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
- Clusters go before endpoints, listeners before routes; clusters are removed only at
  the end of a push, after the routes that used them, and an updated cluster gets its
  endpoints again (Envoy finishes warming it only on an EDS response).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2

from controlplane import resource
from controlplane.cache.snapshot import Resource, Snapshot, TypeSnapshot
from controlplane.server.limits import MAX_ERROR_CHARS, Limits
from controlplane.server.stream import Handled, Nack, Push, StreamBase, TypeState


@dataclass(slots=True)
class DeltaTypeState(TypeState):
    client: dict[str, str] = field(default_factory=dict)  # what the client holds: name -> version
    told_absent: set[str] = field(default_factory=set)
    base: TypeSnapshot | None = None  # the snapshot the client was last brought up to date with


class DeltaStream(StreamBase):
    protocol = "delta"

    def __init__(
        self, stream_id: int, api: str, fixed_type: str | None = None, identifier: str = "",
        limits: Limits | None = None,
    ) -> None:
        super().__init__(stream_id, api, fixed_type, identifier, limits)
        self.types: dict[str, DeltaTypeState] = {}

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
            state.client = dict(request.initial_resource_versions)
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

        was_wildcard = state.wildcard
        for name in request.resource_names_subscribe:
            if name == "*":
                state.wildcard = True
                continue
            if not first and name not in state.names:
                state.client.pop(name, None)  # asked again: send it even if unchanged
            state.names.add(name)
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
        if self.snapshot is not None:
            typed = self._typed(type_url)
            # Only the names this request touched can need an answer, unless the stream
            # is new to this snapshot or just turned to wildcard: then look at everything.
            everything = state.base is None or (state.wildcard and not was_wildcard)
            touched = {*request.resource_names_subscribe, *request.resource_names_unsubscribe}
            touched.discard("*")
            if not everything and not touched:
                return handled  # a plain ACK or NACK
            updated, removed = self._changes(typed, state, None if everything else touched)
            state.base = typed
            push = self._emit(type_url, state, typed, updated, removed)
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
            if type_url == resource.ENDPOINT and rewarm:
                for name in rewarm:
                    state.client.pop(name, None)
                if candidates is not None:
                    candidates |= rewarm
            updated, removed = self._changes(typed, state, candidates)
            state.base = typed
            if had_config and type_url in (resource.CLUSTER, resource.ENDPOINT):
                push = self._emit(type_url, state, typed, updated, [])
                removal = self._emit(type_url, state, typed, [], removed)
                if removal is not None:
                    tail.append(removal)
            else:
                push = self._emit(type_url, state, typed, updated, removed)
            if push is not None:
                pushes.append(push)
            if type_url == resource.CLUSTER:
                for cluster in updated:
                    rewarm |= cluster.refs.get(resource.ENDPOINT, frozenset())
        return pushes + tail

    def _typed(self, type_url: str) -> TypeSnapshot:
        assert self.snapshot is not None
        return self.snapshot.get(type_url) or TypeSnapshot(type_url, "", {})

    @staticmethod
    def _changes(typed: TypeSnapshot, state: DeltaTypeState,
                 candidates: set[str] | None) -> tuple[list[Resource], list[str]]:
        """What to send and what to remove, looking only at ``candidates`` (the names
        changed since the stream's base) or, when None, at everything."""
        res = typed.resources
        if candidates is None:
            names = set(state.client) | state.names | (set(res) if state.wildcard else set())
        else:
            names = candidates

        def in_scope(name: str) -> bool:
            return name in res and (state.wildcard or name in state.names)

        ordered = sorted(names)
        updated = [res[n] for n in ordered if in_scope(n) and state.client.get(n) != res[n].version]
        removed = [n for n in ordered if n in state.client and not in_scope(n)]
        removed += [n for n in ordered if n in state.names and n not in res
                    and n not in state.client and n not in state.told_absent]
        return updated, removed

    def _emit(self, type_url: str, state: DeltaTypeState, typed: TypeSnapshot,
              updated: list[Resource], removed: list[str]) -> Push | None:
        if not updated and not removed:
            return None
        version = typed.version
        nonce = self.next_nonce()
        header = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version, type_url=type_url, nonce=nonce,
            removed_resources=removed, control_plane=self._control_plane,
        ).SerializeToString()
        payload = header + b"".join(r.delta_chunk for r in updated)
        for r in updated:
            state.client[r.name] = r.version
        for name in removed:
            state.client.pop(name, None)
            if name in state.names:
                state.told_absent.add(name)
        state.nonce, state.sent_version = nonce, version
        state.pushes += 1
        return Push(type_url, nonce, version, payload, [r.name for r in updated], removed)
