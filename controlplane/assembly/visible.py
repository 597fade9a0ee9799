"""Which services each proxy group sees: worked out once per (service, namespace,
on_demand) and mesh, from the scoping rules (``visible_services``). Equal sets are one
object, so the layers keyed by them are shared by every group that has them."""

from __future__ import annotations

from typing import TypeAlias

from controlplane.mesh.model import Mesh
from controlplane.proxy import ProxyIdentity
from controlplane.translator.visibility import visible_services

Visible: TypeAlias = frozenset[str] | None  # service keys a group sees; None: every one
ViewKey: TypeAlias = tuple[str, str, bool]


def view_key(proxy: ProxyIdentity) -> ViewKey:
    """What a group's visible set depends on, besides the mesh."""
    return (proxy.service, proxy.namespace, bool(getattr(proxy, "on_demand", False)))


class VisibleSets:
    """The visible sets of one mesh; carried over from the previous build's while the
    mesh's frame and routing are unchanged (the caller decides: ``previous``)."""

    def __init__(self, mesh: Mesh, previous: VisibleSets | None = None) -> None:
        self._mesh = mesh
        self._sets: dict[ViewKey, Visible] = dict(previous._sets) if previous else {}
        self._interned: dict[frozenset[str], frozenset[str]] = (
            dict(previous._interned) if previous else {})

    def of(self, proxy: ProxyIdentity) -> Visible:
        """The services ``proxy`` sees (None: all)."""
        key = view_key(proxy)
        try:
            return self._sets[key]
        except KeyError:
            pass
        found = visible_services(self._mesh, proxy)
        if found is not None:
            found = self._interned.setdefault(frozenset(found), frozenset(found))
        self._sets[key] = found
        return found

    def of_or_all(self, proxy: ProxyIdentity) -> Visible:
        """As ``of``; all when the scope cannot be read (a scoping bug: that group
        fails on its own build, not the caller's)."""
        try:
            return self.of(proxy)
        except Exception:
            return None

    def keep(self, members: list[ProxyIdentity]) -> dict[ProxyIdentity, Visible]:
        """Drop the sets of groups not among ``members``; their sets, by member."""
        seen = {view_key(p) for p in members}
        # list() first: a worker thread may be adding entries (list() of a dict is atomic).
        self._sets = {k: v for k, v in list(self._sets.items()) if k in seen}
        views = {p: self.of_or_all(p) for p in members}
        self._interned = {v: v for v in views.values() if v is not None}
        return views
