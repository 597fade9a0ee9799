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

Memory at a thousand streams: what a client holds is a view over its snapshot's own
mapping plus the few names that differ (``Held``), and equal subscriptions are one
frozenset shared by every stream that has it (``NAME_SETS``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Set
from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane import resource
from controlplane.cache.snapshot import Resource, Snapshot, TypeSnapshot
from controlplane.proxy import ProxyIdentity
from controlplane.server.held import Held, first_answer, resource_name
from controlplane.server.limits import MAX_ERROR_CHARS, Limits
from controlplane.server.sotw import NAME_SETS
from controlplane.server.stream import (
    Handled,
    Nack,
    Push,
    StreamBase,
    TypeState,
    length_delimited,
)
from controlplane.server.vhds import resolve, with_aliases
from controlplane.server.vhds import unresolved as unresolved_entries

_NONE: frozenset[str] = frozenset()


@dataclass(slots=True)
class DeltaTypeState(TypeState):
    client: Held = field(default_factory=Held)  # what the client holds: name -> version
    subscribed: frozenset[str] = _NONE  # the names asked for, shared (NAME_SETS)
    told_absent: set[str] = field(default_factory=set)
    base: TypeSnapshot | None = None  # the snapshot the client was last brought up to date with
    synced: bool = False  # the client holds exactly ``base``'s resources
    # Resources named through an alias the client subscribed to (VHDS), as of ``base``.
    targets: frozenset[str] = _NONE
    owed: bool = False  # a first request from a client that holds nothing: answer it

    def subscription(self) -> Set[str]:
        return self.subscribed


class DeltaStream(StreamBase):
    protocol = "delta"

    def __init__(
        self, stream_id: int, api: str, fixed_type: str | None = None, identifier: str = "",
        limits: Limits | None = None,
    ) -> None:
        super().__init__(stream_id, api, fixed_type, identifier, limits)
        self.types: dict[str, DeltaTypeState] = {}
        # Load assignments of clusters sent since the last EDS answer: sent again even if
        # the client holds them (Envoy warms an updated cluster only on an EDS response).
        self._rewarm: set[str] = set()
        # Clusters sent before EDS was asked for, their load assignments not yet listed:
        # only a client that comes to EDS holding some needs them (a thousand set updates
        # per new stream otherwise, a sixteenth of the initial sync's CPU).
        self._rewarm_from: list[list[Resource]] = []
        self._trailer: bytes | None = None  # the encoded control_plane field

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
            state.client = Held(request.initial_resource_versions)
            state.owed = not request.initial_resource_versions
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
        was_wildcard = state.wildcard and not first  # (a first request holds by no rule)
        added = set(request.resource_names_subscribe)
        dropped = set(request.resource_names_unsubscribe)
        if "*" in added:
            state.wildcard = True
        if "*" in dropped:
            state.wildcard = False
        added.discard("*")
        dropped.discard("*")
        if not first:  # asked again, subscribed or not: answer it even if unchanged
            for name in added - dropped:
                state.client.discard(name)
                if typed is not None and (target := resolve(typed.aliases, name)):
                    state.client.discard(target)
                state.told_absent.discard(name)
        for name in dropped:
            state.client.discard(name)
            state.told_absent.discard(name)
        if added or dropped:
            state.subscribed = NAME_SETS.intern((state.subscribed | added) - dropped)
        if was_wildcard and not state.wildcard:  # the client drops what it no longer wants
            state.client.keep_only(state.subscribed | state.targets)
            state.synced = False
        # A name subscribed or dropped is forgotten above and looked at below: if the
        # client held exactly its snapshot before, it does again after this answer.

        handled = Handled(kind, type_url, error=error)
        if typed is not None:
            # Only the names this request touched can need an answer, unless the stream
            # is new to this snapshot or just turned to wildcard: then look at everything.
            everything = state.base is None or (state.wildcard and not was_wildcard)
            touched = added | dropped
            if not everything and not touched and not state.owed:
                return handled  # a plain ACK or NACK
            old_targets = state.targets
            state.targets = _targets(typed, state.subscribed)
            if not everything:
                touched |= state.targets ^ old_targets
                touched |= _targets(typed, touched)
            if type_url == resource.ENDPOINT and (self._rewarm or self._rewarm_from):
                touched |= self._take_rewarm(state, typed)
            push = self._update(type_url, state, typed, None if everything else touched)
            if push is not None:
                handled.pushes.append(push)
        return handled

    def on_snapshot(self, snapshot: Snapshot) -> list[Push]:
        had_config = self.snapshot is not None
        self.snapshot = snapshot
        pushes: list[Push] = []
        tail: list[Push] = []
        for type_url in resource.PUSH_ORDER:
            state = self.types.get(type_url)
            if state is None:
                continue
            typed = self._typed(type_url)
            candidates = None if state.base is None else set(typed.changed_since(state.base))
            old_targets = state.targets
            state.targets = _targets(typed, state.subscribed)
            if candidates is not None:
                candidates |= state.targets ^ old_targets
            if type_url == resource.ENDPOINT and (self._rewarm or self._rewarm_from):
                rewarm = self._take_rewarm(state, typed)
                if candidates is not None:
                    candidates |= rewarm
            split = had_config and type_url in (resource.CLUSTER, resource.ENDPOINT)
            push = self._update(type_url, state, typed, candidates, tail if split else None)
            if push is not None:
                pushes.append(push)
        return pushes + tail

    def _take_rewarm(self, state: DeltaTypeState, typed: TypeSnapshot) -> set[str]:
        """The load assignments to send again: forgotten as held, to be looked at (so a
        client that held exactly its snapshot does again once they are sent). One that
        is gone stays held: its removal is what the client gets."""
        rewarm, pending = self._rewarm, self._rewarm_from
        self._rewarm, self._rewarm_from = set(), []
        if pending and (state.base is not None or not state.client.empty()):
            for clusters in pending:  # (a client that holds nothing gets them all anyway)
                for cluster in clusters:
                    rewarm.update(cluster.refs.get(resource.ENDPOINT, ()))
        if state.client.empty():
            return rewarm
        present, held = typed.resources, state.client
        for name in rewarm:
            if name in held and name in present:
                held.discard(name)
        return rewarm

    def _typed(self, type_url: str) -> TypeSnapshot:
        assert self.snapshot is not None
        return self.snapshot.get(type_url) or TypeSnapshot(type_url, "", {})

    def _update(self, type_url: str, state: DeltaTypeState, typed: TypeSnapshot,
                candidates: set[str] | None, removals: list[Push] | None = None
                ) -> Push | None:
        """Bring the client up to date with ``typed`` (looking only at ``candidates``,
        the names changed since its base, or at everything when None). With
        ``removals``, removals go there, to be sent after the rest of the push."""
        updated, removed, unresolved, whole = self._changes(typed, state, candidates)
        if type_url == resource.CLUSTER and updated and self.fixed_type is None:
            # EDS not asked for yet may come holding these (a reconnect); EDS asked for
            # but never answered will get everything anyway.
            endpoints = self.types.get(resource.ENDPOINT)
            if endpoints is None:
                self._rewarm_from.append(updated)
            elif endpoints.base is not None or not endpoints.client.empty():
                for cluster in updated:
                    self._rewarm.update(cluster.refs.get(resource.ENDPOINT, ()))
        synced = whole and (candidates is None or state.synced)
        state.base = typed
        track = not synced  # when synced, the snapshot's mapping replaces it all below
        if removals is None:
            push = self._emit(type_url, state, typed, updated, removed, unresolved, track)
        else:
            push = self._emit(type_url, state, typed, updated, [], unresolved, track)
            removal = self._emit(type_url, state, typed, [], removed, [])
            if removal is not None:
                removals.append(removal)
        state.synced = synced
        if synced:  # it holds exactly the snapshot's resources: share that mapping
            state.client.rebase(typed.resources)
        return push

    def _header(self, version: str, type_url: str, nonce: str, removed: list[str]) -> bytes:
        """The DeltaDiscoveryResponse around the resources (field 2, the body), encoded by
        hand as SotW's is: fields 1, 4, 5, each removed name as 6, and 7."""
        if self._trailer is None:
            self._trailer = length_delimited(7, self._control_plane.SerializeToString())
        return b"".join((length_delimited(1, version.encode()),
                         length_delimited(4, type_url.encode()),
                         length_delimited(5, nonce.encode()),
                         *(length_delimited(6, name.encode(), repeated=True)
                           for name in removed), self._trailer))

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
                 ) -> tuple[list[Resource], list[str], list[str], bool]:
        """What to send, what to remove, which aliases nothing answers, and whether every
        resource looked at is one the client wants (then, once this is sent, it holds
        exactly the resources of ``typed`` it had been holding plus these)."""
        res = typed.resources
        wildcard = typed.wildcard
        subscribed, targets, client, told = (state.subscribed, state.targets, state.client,
                                             state.told_absent)

        def wanted(name: str) -> bool:
            if name in subscribed or name in targets:
                return True
            return state.wildcard and (wildcard is None or name in wildcard)

        updated: list[Resource] = []
        removed: list[str] = []
        absent: list[str] = []
        if candidates is None and client.empty():
            updated, absent, whole = first_answer(
                res, state.subscribed, state.targets, state.told_absent, state.wildcard,
                wildcard)
        elif candidates is None:  # everything: walk the snapshot once, no lookup per name
            fresh = client.empty()
            every = state.wildcard and wildcard is None
            whole = True
            present: set[str] = set()
            for found in res.values():
                name = found.name
                present.add(name)
                held = None if fresh else client.get(name)
                if every or wanted(name):
                    if held != found.version:
                        updated.append(found)
                    continue
                whole = False
                if held is not None:
                    removed.append(name)
            gone = (subscribed | targets) if fresh else (client.names() | subscribed | targets)
            for name in sorted(gone - present):
                if name in client:
                    removed.append(name)
                elif name in subscribed and name not in told:
                    absent.append(name)
            updated.sort(key=resource_name)
            removed.sort()
        else:
            whole = True
            get = res.get
            for name in sorted(candidates):
                changed, held = get(name), client.get(name)
                if changed is not None and wanted(name):
                    if held != changed.version:
                        updated.append(changed)
                    continue
                if changed is not None:
                    whole = False  # a changed resource the client does not want
                if held is not None:
                    removed.append(name)
                elif changed is None and name in subscribed and name not in told:
                    absent.append(name)
        if typed.type_url != resource.VIRTUAL_HOST:
            return updated, removed + absent, [], whole
        # A Host Envoy asked for: answered by its virtual host (sent above, with the alias)
        # or, when nothing serves it, by the alias alone, so the held request gets a 404.
        unresolved = [n for n in absent if "/" in n]
        return updated, [*removed, *(n for n in absent if "/" not in n)], [
            n for n in unresolved if resolve(typed.aliases, n) is None], whole

    def _emit(self, type_url: str, state: DeltaTypeState, typed: TypeSnapshot,
              updated: list[Resource], removed: list[str], unresolved: list[str],
              track: bool = True) -> Push | None:
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
        header = self._header(version, type_url, nonce, removed)
        if typed.aliases and state.subscribed:
            chunks = with_aliases(updated, typed.aliases, state.subscribed)
        else:
            chunks = [r.delta_chunk for r in updated]
        if unresolved:
            chunks.append(unresolved_entries(unresolved))
        if track:
            for r in updated:
                state.client.hold(r.name, r.version)
        for name in [*removed, *unresolved]:
            state.client.discard(name)
            if name in state.subscribed:
                state.told_absent.add(name)
        state.nonce, state.sent_version = nonce, version
        state.pushes += 1
        return Push(type_url, nonce, version, header, [r.name for r in updated],
                    [*removed, *unresolved], body=chunks,
                    body_bytes=sum(map(len, chunks)))


def _targets(typed: TypeSnapshot, names: Iterable[str]) -> frozenset[str]:
    """The resources the subscribed aliases resolve to (none for types without aliases)."""
    aliases = typed.aliases
    if not aliases:
        return _NONE
    return frozenset(target for n in names if (target := resolve(aliases, n)) is not None)
