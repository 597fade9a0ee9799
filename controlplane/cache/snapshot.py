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
import itertools
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence, ValuesView
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from controlplane import resource
from controlplane.cache.layers import Layer, diff, digest_version, member_hash
from controlplane.cache.references import References, dangling, references

# The types every snapshot has (an empty one says "none", which SotW needs to say).
STANDARD: tuple[str, ...] = (resource.CLUSTER, resource.ENDPOINT, resource.LISTENER,
                             resource.ROUTE, resource.SECRET)
_NO_ALIASES: Mapping[str, str] = MappingProxyType({})
_NOTHING: Mapping[str, Resource] = MappingProxyType({})


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Resource:
    """One resource with its wire encodings prepared."""

    name: str
    type_url: str
    message: Message
    version: str
    sotw_chunk: bytes
    delta_chunk: bytes
    refs: References
    digest: int = -1  # its share of every set hash it is in (computed when not given)

    def __post_init__(self) -> None:
        if self.digest < 0:
            object.__setattr__(self, "digest", member_hash(self.name, self.version))

    @property
    def size(self) -> int:
        return len(self.sotw_chunk)


@dataclass(frozen=True, slots=True)
class TypeSnapshot:
    """All resources of one type, and their version (a set hash of names and contents).

    Built from shared layers plus the group's own layer (``layered``): ``resources`` is
    then a read-only view over them, the version their digests' sum, and the diff
    against the group's previous TypeSnapshot comes from the layers' recorded changes.
    The plain form (``TypeSnapshot(type_url, version, resources)``) still works."""

    type_url: str
    version: str
    resources: Mapping[str, Resource]
    # The names a wildcard subscription gets (None: every resource); names asked for
    # explicitly may be any of ``resources`` (on-demand groups serve the rest by name).
    wildcard: frozenset[str] | None = None
    # A requested name -> the resource that answers it (VHDS: ``egress/<host>``).
    aliases: Mapping[str, str] = field(default_factory=lambda: _NO_ALIASES)
    layers: tuple[Layer, ...] = ()
    own: Layer | None = None
    _diffs: dict[str, frozenset[str]] = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def layered(type_url: str, layers: Sequence[Layer], own: Layer | None = None,
                wildcard: frozenset[str] | None = None,
                aliases: Mapping[str, str] | None = None,
                reuse: TypeSnapshot | None = None) -> TypeSnapshot:
        """Shared ``layers`` plus the group's ``own`` (names must not repeat across
        them); ``reuse`` itself when it is made of the same. O(own) besides that."""
        shared = tuple(layers)
        alias = _NO_ALIASES if aliases is None else aliases
        if reuse is not None and _same(reuse, type_url, shared, own, wildcard, alias):
            return reuse
        parts = (*shared, own) if own is not None else shared
        if len(parts) > 1:
            _check_disjoint(type_url, parts)
        resources: Mapping[str, Resource]
        if not parts:
            resources = _NOTHING
        elif len(parts) == 1:
            resources = parts[0].resources
        else:
            resources = _Chained(tuple(p.resources for p in parts))
        version = digest_version(sum(p.digest for p in parts))
        return TypeSnapshot(type_url, version, resources, wildcard, alias, shared, own)

    def made_of(self, type_url: str, layers: Sequence[Layer], own: Layer | None = None,
                wildcard: frozenset[str] | None = None,
                aliases: Mapping[str, str] | None = None) -> bool:
        """Whether ``layered`` of these would give the same content (and flags)."""
        alias = _NO_ALIASES if aliases is None else aliases
        return _same(self, type_url, tuple(layers), own, wildcard, alias)

    @property
    def parts(self) -> tuple[Layer, ...]:
        """The layers then the own layer (empty for the plain form)."""
        return (*self.layers, self.own) if self.own is not None else self.layers

    @property
    def size(self) -> int:
        parts = self.parts
        if parts:
            return sum(p.size for p in parts)
        return sum(r.size for r in self.resources.values())

    def changed_since(self, old: TypeSnapshot | None) -> frozenset[str]:
        """Names added, changed or removed since ``old``. Every stream asks the same
        question after a change, so the answer is computed once and kept, by the old
        version (a set hash of every name and resource version, so it says it all).
        Layered on both sides: O(changed) from the layers' records."""
        if old is None:
            return frozenset(self.resources)
        if old.version == self.version:
            return frozenset()
        cached = self._diffs.get(old.version)
        if cached is not None:
            return cached
        by_parts = self._diff_parts(old)
        result = frozenset(by_parts if by_parts is not None
                           else diff(self.resources, old.resources))
        if len(self._diffs) >= 8:
            self._diffs.clear()
        self._diffs[old.version] = result
        return result

    def _diff_parts(self, old: TypeSnapshot) -> set[str] | None:
        """Part by part (a superset of the changes when a name moved between parts,
        which is harmless: it is sent again as it is)."""
        mine, theirs = self.parts, old.parts
        if not mine or len(mine) != len(theirs):
            return None
        changed: set[str] = set()
        for new, prev in zip(mine, theirs, strict=True):
            if new is prev or new.version == prev.version:
                continue
            known = new.changed_since(prev.version)
            changed.update(known if known is not None else diff(new.resources, prev.resources))
        return changed


def _same(typed: TypeSnapshot, type_url: str, layers: tuple[Layer, ...], own: Layer | None,
          wildcard: frozenset[str] | None, aliases: Mapping[str, str]) -> bool:
    if typed.type_url != type_url or len(typed.layers) != len(layers):
        return False
    if not typed.parts and typed.resources:  # the plain form: not made of layers
        return False
    if typed.layers != layers and any(a.version != b.version  # (== is identity first)
                                      for a, b in zip(typed.layers, layers, strict=True)):
        return False
    if (typed.own.version if typed.own else None) != (own.version if own else None):
        return False
    if typed.wildcard is not wildcard and typed.wildcard != wildcard:
        return False
    return typed.aliases is aliases or (not typed.aliases and not aliases)


def _check_disjoint(type_url: str, parts: tuple[Layer, ...]) -> None:
    """ValueError when a name is in two parts; costs the sizes of all but the largest."""
    largest = max(parts, key=len)
    seen: set[str] = set()
    for part in parts:
        if part is largest:
            continue
        for name in part.resources:
            if name in seen or name in largest.resources:
                raise ValueError(f"duplicate {resource.short_name(type_url)} resource {name!r}")
            seen.add(name)


class _Chained(Mapping[str, Resource]):
    """A read-only view over a few disjoint name maps, looked up in order."""

    __slots__ = ("_parts",)

    def __init__(self, parts: tuple[Mapping[str, Resource], ...]) -> None:
        self._parts = parts

    def __getitem__(self, name: str) -> Resource:
        for part in self._parts:
            found = part.get(name)
            if found is not None:
                return found
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        for part in self._parts:  # noqa: SIM110 (a loop is 4x any(): asked per name)
            if name in part:
                return True
        return False

    def __iter__(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self._parts)  # iterated in C

    def __len__(self) -> int:
        return sum(len(part) for part in self._parts)

    def values(self) -> ValuesView[Resource]:
        return _ChainedValues(self, self._parts)


class _ChainedValues(ValuesView[Resource]):
    """Iterates the parts' own values (no lookup per name)."""

    __slots__ = ("_parts",)

    def __init__(self, chained: _Chained, parts: tuple[Mapping[str, Resource], ...]) -> None:
        super().__init__(chained)
        self._parts = parts

    def __iter__(self) -> Iterator[Resource]:
        return itertools.chain.from_iterable(part.values() for part in self._parts)


@dataclass(frozen=True, slots=True)
class Snapshot:
    types: Mapping[str, TypeSnapshot]
    version: str = field(default="")
    encoded_bytes: int = 0  # bytes serialized to build it (pre-encoded resources excluded)
    _problems: list[list[str]] = field(default_factory=list, compare=False, repr=False)
    # The group's previous snapshot, until problems() has used it (see there).
    _base: list[Snapshot] = field(default_factory=list, compare=False, repr=False)

    @staticmethod
    def of(types: Mapping[str, TypeSnapshot], encoded_bytes: int = 0,
           reuse: Snapshot | None = None) -> Snapshot:
        """A snapshot of ``types`` (in the order given: ADS order); ``reuse`` itself when
        each of its types is the same object."""
        if (reuse is not None and reuse.types.keys() == types.keys()
                and all(reuse.types[t] is typed for t, typed in types.items())):
            return reuse
        joined = "/".join(t.version for t in types.values())
        overall = hashlib.sha256(joined.encode()).hexdigest()[:16]
        made = Snapshot(MappingProxyType(dict(types)), overall, encoded_bytes)
        if reuse is not None:
            reuse._base.clear()  # no chain of old snapshots
            made._base.append(reuse)
        return made

    def get(self, type_url: str) -> TypeSnapshot | None:
        return self.types.get(type_url)

    def versions(self) -> dict[str, str]:
        return {resource.short_name(t): s.version for t, s in self.types.items()}

    def problems(self) -> list[str]:
        """What makes this snapshot inconsistent (empty when it may be published): every
        listener's routes, every route's clusters, every EDS cluster's endpoints exist.
        Computed once (the pipeline does it off the event loop) and kept. A shared
        layer's references are checked once per set of target layers, not per group;
        a group's own resources are checked one by one; and when the group's previous
        snapshot was consistent, only the references into or out of the types that
        changed since are looked at."""
        if self._problems:
            return list(self._problems[0])
        base = self._base.pop() if self._base else None
        changed: set[str] | None = None
        if (base is not None and base._problems and not base._problems[0]
                and base.types.keys() == self.types.keys()):
            changed = {t for t, typed in self.types.items() if base.types[t] is not typed}
        found = self._problems_by_layer(changed)
        if found is None:
            found = self._problems_each()
        self._problems.append(found)
        return list(found)

    def _problems_by_layer(self, changed: set[str] | None = None) -> list[str] | None:
        """[] when nothing is missing; None when a layer misses something (then every
        resource is looked at, to name it) or a type is in the plain form. Own layers'
        answers are remembered too (by the versions they were checked against), so a
        change elsewhere costs a group a few lookups. ``changed``: the types that differ
        from a consistent previous snapshot (None: check every reference)."""
        before = self.types.keys() - changed if changed is not None else set()
        for type_url, typed in self.types.items():
            if not typed.parts and typed.resources:
                return None
            for layer in typed.parts:
                for target in layer.wants():
                    if type_url in before and target in before:
                        continue  # neither end changed: it was there before
                    have = self.types.get(target)
                    if have is None:
                        return None
                    if layer is typed.own:  # remembered on the group's own layer
                        if layer.missing(target, have.parts):
                            return None
                        continue
                    missing = layer.missing(target, have.layers)
                    own = have.own.resources if have.own is not None else _NOTHING
                    if any(name not in own for name in missing):
                        return None
        return []

    def _problems_each(self) -> list[str]:
        present = {t: s.resources for t, s in self.types.items()}
        found: list[str] = []
        for type_url, typed in self.types.items():
            for res in typed.resources.values():
                if res.refs:
                    found += dangling(type_url, res.name, res.refs, present)
        return found


def encode_resource(
    type_url: str, name: str, message: Message, reuse: Resource | None = None
) -> Resource:
    """Serialize once; hand back ``reuse`` instead when the bytes did not change, or
    the Resource already made of the same bytes while that one is alive (sidecars'
    egress listeners are alike: one object, its chunks and references, for all)."""
    value = message.SerializeToString(deterministic=True)
    version = hashlib.sha256(value).hexdigest()[:16]
    if reuse is not None and reuse.version == version and reuse.name == name:
        return reuse
    key = (type_url, name, version)
    alive = _ALIVE.get(key)
    if alive is not None:
        return alive
    packed = any_pb2.Any(type_url=type_url, value=value)
    sotw = discovery_pb2.DiscoveryResponse(resources=[packed]).SerializeToString()
    delta = discovery_pb2.DeltaDiscoveryResponse(
        resources=[discovery_pb2.Resource(name=name, version=version, resource=packed)]
    ).SerializeToString()
    made = Resource(name, type_url, message, version, sotw, delta,
                    references(type_url, message))
    _ALIVE[key] = made
    return made


# Every Resource some snapshot, layer or build still holds, by (type, name, version).
_ALIVE: weakref.WeakValueDictionary[tuple[str, str, str], Resource] = (
    weakref.WeakValueDictionary())


def type_version(resources: Iterable[Resource]) -> str:
    """The set hash of ``resources``: what a layered TypeSnapshot of them would say."""
    return digest_version(sum(r.digest for r in resources))


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
        if type_url not in STANDARD and type_url not in named:
            continue  # an optional type (VHDS): only when given
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
        typed = TypeSnapshot.layered(type_url, (), Layer.of(type_url, encoded.values()))
        if previous is not None and previous.version == typed.version:
            typed = previous
        types[type_url] = typed
    return Snapshot.of(types, encoded_bytes)
