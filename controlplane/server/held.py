"""What a delta client holds of one type (name -> version), without a copy per stream.

A thousand sidecars that each hold the thousand clusters of their snapshot would keep a
thousand dicts of a thousand entries. Mostly, a client holds exactly the resources of
the snapshot it was last brought up to date with: then the view is that snapshot's own
mapping, shared with every stream of the group, and only the names that differ from it
(a removal, an update not sent, a name the client announced on reconnect) are kept.

And what a client that holds nothing is sent first (``first_answer``).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Set
from types import MappingProxyType

from controlplane.cache.snapshot import Resource

_EMPTY: Mapping[str, Resource] = MappingProxyType({})


class Held:
    __slots__ = ("_base", "_diff")

    def __init__(self, versions: Mapping[str, str] | None = None) -> None:
        self._base: Mapping[str, Resource] = _EMPTY
        self._diff: dict[str, str | None] = dict(versions or {})  # None: not held

    def get(self, name: str) -> str | None:
        """The version the client holds, or None."""
        if name in self._diff:
            return self._diff[name]
        found = self._base.get(name)
        return found.version if found is not None else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __bool__(self) -> bool:
        return any(v is not None for v in self._diff.values()) or any(
            n not in self._diff for n in self._base)

    def empty(self) -> bool:
        """True when nothing was ever held (a cheap check, for a client's first answer)."""
        return not self._diff and not self._base

    def hold(self, name: str, version: str) -> None:
        found = self._base.get(name)
        if found is not None and found.version == version:
            self._diff.pop(name, None)
        else:
            self._diff[name] = version

    def discard(self, name: str) -> None:
        if name in self._base:
            self._diff[name] = None
        else:
            self._diff.pop(name, None)

    def names(self) -> set[str]:
        """Every name held (O(held): for the rare passes that look at everything)."""
        found = {n for n in self._base if n not in self._diff}
        found.update(n for n, v in self._diff.items() if v is not None)
        return found

    def keep_only(self, wanted: Set[str]) -> None:
        """Forget what is not in ``wanted`` (the client dropped its wildcard)."""
        kept = {n: v for n in self.names() if n in wanted and (v := self.get(n)) is not None}
        self._base, self._diff = _EMPTY, dict(kept)

    def rebase(self, resources: Mapping[str, Resource]) -> None:
        """The client now holds exactly ``resources``: share that mapping, keep nothing."""
        self._base, self._diff = resources, {}

    def items(self) -> Iterable[tuple[str, str]]:
        for name in self.names():
            version = self.get(name)
            if version is not None:
                yield name, version

    @property
    def own_entries(self) -> int:
        """Entries this view keeps for itself (not shared): a measure of its memory."""
        return len(self._diff)


resource_name = operator.attrgetter("name")


def first_answer(res: Mapping[str, Resource], subscribed: frozenset[str],
                 targets: frozenset[str], told_absent: Set[str], is_wildcard: bool,
                 wildcard: frozenset[str] | None) -> tuple[list[Resource], list[str], bool]:
    """``DeltaStream._changes`` for a client that holds nothing, in set operations
    rather than a look at each name (a thousand new streams each get a thousand clusters
    and endpoints): what to send, the names asked for that do not exist, and whether
    every resource is wanted."""
    if is_wildcard and wildcard is None:
        picked = list(res.values())
    else:
        want = subscribed | targets if targets else subscribed
        if is_wildcard and wildcard:
            want = want | wildcard
        if len(want) >= len(res) and want.issuperset(res):
            picked = list(res.values())
        else:
            picked = [r for r in res.values() if r.name in want]
    picked.sort(key=resource_name)
    missing = subscribed.difference(res) if subscribed else frozenset()
    absent = sorted(missing - told_absent) if missing else []
    return picked, absent, len(picked) == len(res)
