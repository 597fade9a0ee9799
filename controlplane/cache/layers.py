"""Layers: resources of one type, encoded once and shared by every group that sees them.

A group's resources of one type are a few shared layers (every visible service's
clusters, say) plus its own. A layer's version is a set hash: each member contributes
the first 16 bytes of sha256(name \\0 version) as an integer, and the layer's digest is
their sum mod 2**128. Sums add up across layers and do not depend on order, so a group's
type version is the sum of its parts' digests: the same content gives the same version
on every replica, however it was reached, and replacing one resource costs O(1).

A layer derived from another by replacing k resources records the names it changed,
by the version it was derived from (and a few ancestors'), so "what changed since the
version this stream has" is O(k), not a diff of every name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING

from controlplane.resource import short_name

if TYPE_CHECKING:
    from controlplane.cache.snapshot import Resource

MODULUS = 1 << 128
_HISTORY = 4  # ancestors whose diff a layer remembers (a stream may skip versions)
_CHECKS = 16  # reference checks remembered per layer (by the target layers' versions)


def member_hash(name: str, version: str) -> int:
    """A resource's contribution to every set hash it is part of."""
    data = hashlib.sha256(f"{name}\0{version}".encode()).digest()
    return int.from_bytes(data[:16], "big")


def digest_version(digest: int) -> str:
    """The version string of a set hash (16 hex characters, like a resource version)."""
    return f"{digest % MODULUS:032x}"[:16]


class Layer:
    """An immutable set of resources of one type, with its set hash and total size."""

    __slots__ = (
        "_checked",
        "_history",
        "_members",
        "_wants",
        "digest",
        "resources",
        "size",
        "type_url",
        "version",
    )

    def __init__(self, type_url: str, resources: dict[str, Resource], digest: int, size: int,
                 history: dict[str, frozenset[str]] | None = None) -> None:
        self.type_url = type_url
        self._members = resources  # never changed: derived layers copy it
        self.resources: Mapping[str, Resource] = MappingProxyType(resources)
        self.digest = digest % MODULUS
        self.version = digest_version(self.digest)
        self.size = size
        self._history = history or {}
        self._wants: dict[str, frozenset[str]] | None = None
        self._checked: dict[tuple[str, tuple[str, ...]], frozenset[str]] = {}

    @staticmethod
    def of(type_url: str, resources: Iterable[Resource]) -> Layer:
        """A layer of ``resources``; ValueError when two share a name."""
        members: dict[str, Resource] = {}
        digest = size = 0
        for res in resources:
            if res.name in members:
                raise ValueError(f"duplicate {short_name(type_url)} resource {res.name!r}")
            members[res.name] = res
            digest += res.digest
            size += res.size
        return Layer(type_url, members, digest, size)

    def __len__(self) -> int:
        return len(self.resources)

    def __repr__(self) -> str:
        return f"Layer({short_name(self.type_url)}, {len(self)} resources, {self.version})"

    def replace(self, remove: Iterable[str], add: Iterable[Resource]) -> Layer:
        """This layer without ``remove`` and with ``add`` (which wins over ``remove``).
        Costs a copy of the name map (C speed) plus O(changed); ``self`` when nothing
        changes, so groups that share it see no change either."""
        incoming = {r.name: r for r in add}
        members = dict(self._members)
        changed: set[str] = set()
        digest, size = self.digest, self.size
        for name in {*remove, *incoming}:
            old, new = members.get(name), incoming.get(name)
            if old is not None and new is not None and old.version == new.version:
                continue  # the same bytes: keep the old object, nothing changed
            if old is None and new is None:
                continue
            if old is not None:
                del members[name]
                digest -= old.digest
                size -= old.size
            if new is not None:
                members[name] = new
                digest += new.digest
                size += new.size
            changed.add(name)
        if not changed:
            return self
        done = frozenset(changed)
        history = {self.version: done}
        limit = max(8, len(members) // 4)  # past that, a full diff is as cheap
        for version, names in list(self._history.items())[: _HISTORY - 1]:
            union = names | done
            if len(union) <= limit and version not in history:  # a version seen again
                history[version] = union
        return Layer(self.type_url, members, digest, size, history)

    def changed_since(self, version: str) -> frozenset[str] | None:
        """Names changed since this layer's ancestor of ``version``; None when unknown."""
        if version == self.version:
            return frozenset()
        return self._history.get(version)

    def wants(self) -> Mapping[str, frozenset[str]]:
        """Every name this layer's resources point at, by target type (computed once)."""
        wants = self._wants
        if wants is None:
            found: dict[str, set[str]] = {}
            for res in self.resources.values():
                for target, names in res.refs.items():
                    found.setdefault(target, set()).update(names)
            wants = self._wants = {t: frozenset(n) for t, n in found.items()}
        return wants

    def missing(self, target: str, layers: Sequence[Layer]) -> frozenset[str]:
        """The names of ``target`` type this layer points at that none of ``layers``
        holds. Remembered by the layers' versions: every group that shares this layer
        and those layers asks once."""
        wanted = self.wants().get(target)
        if not wanted:
            return frozenset()
        key = (target, tuple(layer.version for layer in layers))
        found = self._checked.get(key)
        if found is None:
            found = frozenset(n for n in wanted
                              if not any(n in layer.resources for layer in layers))
            if len(self._checked) >= _CHECKS:
                self._checked.clear()
            self._checked[key] = found
        return found


def diff(new: Mapping[str, Resource], old: Mapping[str, Resource]) -> set[str]:
    """Names added, changed or removed from ``old`` to ``new`` (a full comparison)."""
    changed = {n for n, r in new.items() if (o := old.get(n)) is None or o.version != r.version}
    changed.update(n for n in old if n not in new)
    return changed


_EMPTY: dict[str, Layer] = {}


def empty_layer(type_url: str) -> Layer:
    """The layer with nothing in it (one per type)."""
    found = _EMPTY.get(type_url)
    if found is None:
        found = _EMPTY[type_url] = Layer(type_url, {}, 0, 0)
    return found
