"""What the streams tell the observers of the fleet (convergence, rejections, ...).

A stream calls its observers after it recorded an ACK or a NACK, and when it ends; the
observers read what they need from the stream (``proxy``, ``type_states()``,
``snapshot``). They run on the stream's event loop, inline: an observer must be cheap
(an ACK is the commonest request; a change at a thousand streams is a thousand of them)
and must not block. One that raises is logged, within a budget, and the stream goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import structlog

from controlplane.server.limits import LogBudget
from controlplane.server.stream import StreamBase

log = structlog.get_logger("controlplane.xds")


class StreamObserver(Protocol):
    """Told of each stream's ACKs, NACKs and end."""

    def acked(self, stream: StreamBase, type_url: str) -> None:
        """``stream`` ACKed its last push of ``type_url`` (its ``acked_version`` is set)."""

    def nacked(self, stream: StreamBase, type_url: str, error: str) -> None:
        """``stream`` rejected its last push of ``type_url`` (its ``last_nack`` is set)."""

    def closed(self, stream: StreamBase) -> None:
        """``stream`` ended (its proxy may be None: it never said who it was)."""


class Observers:
    """The observers of a server, called in turn; one that raises does not stop the
    others nor the stream."""

    def __init__(self, observers: Sequence[StreamObserver]) -> None:
        self.observers = tuple(observers)
        self._budget = LogBudget(1.0)  # a broken observer fails on every ACK: log few

    def acked(self, stream: StreamBase, type_url: str) -> None:
        for observer in self.observers:
            try:
                observer.acked(stream, type_url)
            except Exception:
                self._failed(observer, "acked")

    def nacked(self, stream: StreamBase, type_url: str, error: str) -> None:
        for observer in self.observers:
            try:
                observer.nacked(stream, type_url, error)
            except Exception:
                self._failed(observer, "nacked")

    def closed(self, stream: StreamBase) -> None:
        for observer in self.observers:
            try:
                observer.closed(stream)
            except Exception:
                self._failed(observer, "closed")

    def _failed(self, observer: StreamObserver, call: str) -> None:
        dropped = self._budget.take()
        if dropped is None:
            return
        log.error("xds.observer_failed", observer=type(observer).__name__, call=call,
                  exc_info=True, hint="a bug in the control plane; the stream goes on, "
                  "report it with this traceback", **({"suppressed_before": dropped}
                                                      if dropped else {}))


def fan_out(observers: Sequence[StreamObserver]) -> Observers | None:
    """The observers to call, or None when there are none (the streams check that once
    per ACK, and do nothing more)."""
    return Observers(observers) if observers else None
