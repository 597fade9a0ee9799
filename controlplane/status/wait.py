"""``controlplane status --wait``: poll the replicas until every proxy has ACKed the
current version of every type, or a deadline passes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from controlplane.status.model import ProxyStatus

POLL_INTERVAL = 0.5


@dataclass(frozen=True)
class Outcome:
    synced: bool
    proxies: list[ProxyStatus]
    unreachable: list[str]
    waited: float


def wait(look: Callable[[], tuple[list[ProxyStatus], list[str]]], timeout: float,
         clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """Call ``look`` (proxies, unreachable replicas) until every proxy is synced and
    every replica answered, or ``timeout`` seconds passed; the last look."""
    start = clock()
    deadline = start + timeout
    while True:
        proxies, unreachable = look()
        done = not unreachable and all(proxy.synced for proxy in proxies)
        now = clock()
        if done or now >= deadline:
            return Outcome(done, proxies, unreachable, now - start)
        sleep(min(POLL_INTERVAL, max(0.0, deadline - now)))
