"""Immutable snapshots of one proxy group's resources, encoded once.

Every resource is serialized when the snapshot is built, and the bytes that go on the
wire for it (its field inside a DiscoveryResponse and inside a DeltaDiscoveryResponse)
are prepared then too. Protobuf messages concatenate, so a stream answers by joining a
small header with these prepared chunks: no stream serializes a resource again.

Versions are content hashes: two replicas fed the same mesh serve the same versions, and
a proxy that fails over from one to the other sees no change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane import resource
from controlplane.cache.references import References, dangling, references


_NO_ALIASES: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Resource:
    """One resource with its wire encodings prepared."""

    name: str
    type_url: str
    message: Message
    version: str
    sotw_chunk: bytes
    delta_chunk: bytes
    refs: References

    @property
    def size(self) -> int:
        return len(self.sotw_chunk)


@dataclass(frozen=True, slots=True)
class TypeSnapshot:
    """All resources of one type, and their version (a hash of names and contents)."""

    type_url: str
    version: str
    resources: Mapping[str, Resource]
    # The names a wildcard subscription gets (None: every resource); names asked for
    # explicitly may be any of ``resources`` (on-demand groups serve the rest by name).
    wildcard: frozenset[str] | None = None
    # A requested name -> the resource that answers it (VHDS: ``egress/<host>``).
    aliases: Mapping[str, str] = field(default_factory=lambda: _NO_ALIASES)
    _diffs: dict[str, frozenset[str]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.resources.values())

    def changed_since(self, old: TypeSnapshot | None) -> frozenset[str]:
        """Names added, changed or removed since ``old``. Every stream asks the same
        question after a change, so the answer is computed once and kept, by the old
        version: a version hashes every name and resource version, so it says it all."""
        if old is None:
            return frozenset(self.resources)
        if old.version == self.version:
            return frozenset()
        cached = self._diffs.get(old.version)
        if cached is not None:
            return cached
        mine, theirs = self.resources, old.resources
        changed = {n for n, r in mine.items() if (o := theirs.get(n)) is None
                   or o.version != r.version}
        changed.update(n for n in theirs if n not in mine)
        result = frozenset(changed)
        if len(self._diffs) >= 8:
            self._diffs.clear()
        self._diffs[old.version] = result
        return result


@dataclass(frozen=True, slots=True)
class Snapshot:
    types: Mapping[str, TypeSnapshot]
    version: str = field(default="")
    encoded_bytes: int = 0  # bytes serialized to build it (pre-encoded resources excluded)
    _problems: list[list[str]] = field(default_factory=list, compare=False, repr=False)

    def get(self, type_url: str) -> TypeSnapshot | None:
        return self.types.get(type_url)

    def versions(self) -> dict[str, str]:
        return {resource.short_name(t): s.version for t, s in self.types.items()}

    def problems(self) -> list[str]:
        """What makes this snapshot inconsistent (empty when it may be published): every
        listener's routes, every route's clusters, every EDS cluster's endpoints exist.
        Computed once (the pipeline does it off the event loop) and kept."""
        if self._problems:
            return list(self._problems[0])
        present = {t: s.resources.keys() for t, s in self.types.items()}
        found: list[str] = []
        for type_url, typed in self.types.items():
            for res in typed.resources.values():
                if res.refs:
                    found += dangling(type_url, res.name, res.refs, present)
        self._problems.append(found)
        return list(found)


def encode_resource(
    type_url: str, name: str, message: Message, reuse: Resource | None = None
) -> Resource:
    """Serialize once; hand back ``reuse`` instead when the bytes did not change."""
    value = message.SerializeToString(deterministic=True)
    version = hashlib.sha256(value).hexdigest()[:16]
    if reuse is not None and reuse.version == version and reuse.name == name:
        return reuse
    packed = any_pb2.Any(type_url=type_url, value=value)
    sotw = discovery_pb2.DiscoveryResponse(resources=[packed]).SerializeToString()
    delta = discovery_pb2.DeltaDiscoveryResponse(
        resources=[discovery_pb2.Resource(name=name, version=version, resource=packed)]
    ).SerializeToString()
    return Resource(name, type_url, message, version, sotw, delta,
                    references(type_url, message))


def type_version(resources: Iterable[Resource]) -> str:
    digest = hashlib.sha256()
    for res in sorted(resources, key=lambda r: r.name):
        digest.update(res.name.encode())
        digest.update(b"\0")
        digest.update(res.version.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build_snapshot(
    named: Mapping[str, Iterable[tuple[str, Message] | Resource]],
    reuse: Snapshot | None = None,
) -> Snapshot:
    """Encode ``{type_url: [(name, message) or an already encoded Resource]}``.

    With ``reuse``, a resource whose bytes are unchanged keeps the object of the previous
    snapshot (and its prepared chunks), so an endpoint change re-encodes only endpoints.
    Resources passed already encoded (shared by many groups) are taken as they are.
    """
    types: dict[str, TypeSnapshot] = {}
    encoded_bytes = 0
    for type_url in resource.PUSH_ORDER:
        previous = reuse.get(type_url) if reuse else None
        encoded: dict[str, Resource] = {}
        for item in named.get(type_url, ()):
            name = item.name if isinstance(item, Resource) else item[0]
            if name in encoded:
                raise ValueError(f"duplicate {resource.short_name(type_url)} resource {name!r}")
            if isinstance(item, Resource):
                encoded[name] = item
                continue
            old = previous.resources.get(name) if previous else None
            encoded[name] = fresh = encode_resource(type_url, name, item[1], reuse=old)
            encoded_bytes += fresh.size  # serialized to hash it, even when reused
        version = type_version(encoded.values())
        if previous is not None and previous.version == version:
            types[type_url] = previous
        else:
            types[type_url] = TypeSnapshot(type_url, version, MappingProxyType(encoded))
    overall = hashlib.sha256("/".join(t.version for t in types.values()).encode()).hexdigest()
    return Snapshot(MappingProxyType(types), overall[:16], encoded_bytes)
