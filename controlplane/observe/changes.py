"""One mesh change on its way to the proxies: the values the convergence tracker keeps,
and the pure functions around them (what a publish changed, percentiles, display)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from controlplane import resource
from controlplane.cache.snapshot import Snapshot
from controlplane.proxy import ProxyIdentity

# The ``type`` label of the convergence histogram.
TYPE_LABELS: dict[str, str] = {
    resource.CLUSTER: "cluster",
    resource.ENDPOINT: "endpoint",
    resource.LISTENER: "listener",
    resource.ROUTE: "route",
    resource.VIRTUAL_HOST: "virtual_host",
    resource.SECRET: "secret",
}
MAX_LAGGARDS = 10  # node ids named in a log line or in /debug/changes


class TypeVersions(Protocol):
    """What a stream holds of one type (server/stream.py's TypeState)."""

    sent_version: str
    acked_version: str


class ObservedStream(Protocol):
    """What the tracker reads of a stream (server/stream.py's StreamBase): observe does
    not import the server, the server calls observe through server/observer.py."""

    stream_id: int
    proxy: ProxyIdentity | None
    snapshot: Snapshot | None

    def type_states(self) -> Mapping[str, TypeVersions]: ...


def changed_types(before: Snapshot | None, after: Snapshot) -> dict[str, str]:
    """type URL -> new version, for the types whose version differs from ``before``."""
    changed: dict[str, str] = {}
    for type_url, typed in after.types.items():
        old = before.get(type_url) if before is not None else None
        if old is None or old.version != typed.version:
            changed[type_url] = typed.version
    return changed


def percentile(ordered: list[float], fraction: float) -> float:
    """The nearest-rank percentile of sorted values (not empty)."""
    rank = max(1, math.ceil(len(ordered) * fraction))
    return ordered[min(len(ordered), rank) - 1]


@dataclass(eq=False, slots=True)
class Waiter:
    """One affected stream of a change, and the types it has yet to ACK."""

    stream: ObservedStream
    node_id: str
    group: str
    types: dict[str, str]  # type URL -> the version that converges it
    acked: bool = False  # it ACKed at least one of them (else it was not sent any)


@dataclass(eq=False)
class Change:
    """A published mesh change, followed until every affected stream ACKed it."""

    generation: int
    observed_at: float  # the source event's wall-clock time
    published_at: float
    waiting: dict[int, Waiter] = field(default_factory=dict)  # stream id -> waiter
    affected: int = 0  # streams that had to take it (those sent nothing drop out)
    seconds: list[float] = field(default_factory=list)  # per proxy that converged
    gone: int = 0  # affected streams that closed before they ACKed
    result: str = ""  # "" while pending; converged | not_converged | dropped
    laggards: list[str] = field(default_factory=list)  # node ids, when it ended without
    left: int = 0  # streams that had not converged when it ended
    # (group, type URL, version) entries this change holds in the tracker's index
    keys: list[tuple[str, str, str]] = field(default_factory=list)

    def laggard_ids(self) -> list[str]:
        return sorted(w.node_id for w in self.waiting.values())[:MAX_LAGGARDS]

    def figures(self) -> dict[str, float] | None:
        """p50, p99 and max seconds over the proxies that converged; None if none did."""
        if not self.seconds:
            return None
        ordered = sorted(self.seconds)
        return {"p50": round(percentile(ordered, 0.5), 4),
                "p99": round(percentile(ordered, 0.99), 4),
                "max": round(ordered[-1], 4)}

    def describe(self) -> dict[str, Any]:
        """One entry of /debug/changes."""
        return {
            "generation": self.generation,
            "observed_at": self.observed_at,
            "published_at": self.published_at,
            "affected": self.affected,
            "acked": len(self.seconds),
            "pending": self.left if self.result else len(self.waiting),
            "disconnected": self.gone,
            "complete": self.result == "converged",
            "result": self.result or "pending",
            "seconds": self.figures(),
            "laggards": self.laggards if self.result else self.laggard_ids(),
        }
