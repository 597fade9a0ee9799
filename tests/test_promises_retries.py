"""Retries through real Envoy, as the README promises them: on a reset, on a refused
connection, on listed status codes; never back to the host that just failed while
another is available; ``backoff`` between tries; ``timeout`` covering every try.

Each behaviour has a service, and most a twin that differs only in the setting under
test, so the test shows the setting doing the work (not Envoy's defaults). One control
plane and one sidecar serve the whole module; each test uses its own services."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import Envoy, wait_for
from tests.support.promise_rig import Rig, cluster_stat, endpoint, timed, wait_endpoints
from tests.support.promise_servers import (
    RESET,
    Behaviour,
    DeadPort,
    ScriptedHttp,
    always,
    first,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SLOW_BACKOFF = {"base_interval": "400ms", "max_interval": "400ms"}
# name -> (backends: a behaviour, or None for a port where nothing listens; policy)
SERVICES: dict[str, tuple[list[Behaviour | None], dict[str, Any]]] = {
    "resets": ([first(1, RESET)], {"retries": {"attempts": 2, "on": ["reset"]}}),
    "resets-no": ([first(1, RESET)], {"retries": {"attempts": 2, "on": ["connect-failure"]}}),
    "refused": ([None, always(200)], {"retries": {"attempts": 2, "on": ["connect-failure"]}}),
    "refused-no": ([None, always(200)], {}),
    "codes": ([first(1, 409)], {"retries": {
        "attempts": 2, "on": ["retriable-status-codes"], "retriable_status_codes": [409]}}),
    "codes-no": ([first(1, 409)], {"retries": {"attempts": 2, "on": ["5xx"]}}),
    "avoid": ([always(503), always(200)], {
        "load_balancer": {"policy": "random"}, "retries": {"attempts": 1, "on": ["5xx"]}}),
    "backoff": ([always(503)], {"retries": {"attempts": 2, "on": ["5xx"],
                                            "backoff": SLOW_BACKOFF}}),
    "backoff-no": ([always(503)], {"retries": {"attempts": 2, "on": ["5xx"]}}),
    "deadline": ([always(503, 0.2)], {"timeout": "700ms", "retries": {
        "attempts": 10, "on": ["5xx"], "backoff": {"base_interval": "10ms",
                                                   "max_interval": "20ms"}}}),
}


@dataclass
class Retried:
    envoy: Envoy
    backends: dict[str, list[Any]]

    def stat(self, service: str, name: str) -> int:
        return cluster_stat(self.envoy, service, name)

    def statuses(self, service: str, count: int) -> list[int]:
        return [self.envoy.request(service)[0] for _ in range(count)]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Retried]:
    lab = Rig(Path(tmp_path_factory.mktemp("retries")))
    try:
        backends = {name: [lab.own(DeadPort() if b is None else ScriptedHttp(f"{name}-{i}", b))
                           for i, b in enumerate(behaviours)]
                    for name, (behaviours, _) in SERVICES.items()}
        lab.serve([{"name": name, "port": 9080, "policy": policy,
                    "endpoints": [endpoint(b) for b in backends[name]]}
                   for name, (_, policy) in SERVICES.items()])
        envoy = lab.envoy("frontend-1")
        wait_endpoints(envoy, {name: len(b) for name, b in backends.items()})
        yield Retried(envoy, backends)
    finally:
        lab.close()


def test_a_reset_is_retried_with_on_reset(rig: Retried) -> None:
    """The backend resets the connection on its first call: with ``on: [reset]`` the
    caller never sees it; with only ``connect-failure`` (connected, then reset) it does."""
    [backend], [twin] = rig.backends["resets"], rig.backends["resets-no"]
    assert rig.envoy.request("resets")[:2] == (200, "resets-0")
    assert backend.calls == 2 and rig.stat("resets", "upstream_rq_retry") == 1
    assert rig.envoy.request("resets-no")[0] == 503
    assert twin.calls == 1 and rig.stat("resets-no", "upstream_rq_retry") == 0


def test_a_refused_connection_is_retried_on_another_host(rig: Retried) -> None:
    """One of two endpoints refuses connections: with ``on: [connect-failure]`` every
    request succeeds; without retries, the requests sent there fail."""
    _, good = rig.backends["refused"]
    assert rig.statuses("refused", 20) == [200] * 20
    assert good.calls == 20
    assert rig.stat("refused", "upstream_cx_connect_fail") >= 1
    assert rig.stat("refused", "upstream_rq_retry") == rig.stat("refused",
                                                                "upstream_cx_connect_fail")
    assert 503 in rig.statuses("refused-no", 20)


def test_listed_status_codes_are_retried(rig: Retried) -> None:
    """409 is not a 5xx: retried only because ``retriable_status_codes`` lists it."""
    [backend], [twin] = rig.backends["codes"], rig.backends["codes-no"]
    assert rig.envoy.request("codes")[0] == 200
    assert backend.calls == 2
    assert rig.envoy.request("codes-no")[0] == 409
    assert twin.calls == 1


def test_a_retry_avoids_the_host_that_failed(rig: Retried) -> None:
    """Two hosts, one always 503, a random balancer and one retry. Were the retry's
    host drawn afresh, a quarter of the requests would hit the bad host twice (about
    25 of 100, and 8 or fewer once in 10^4 runs); avoiding the host tried (Envoy
    re-draws up to 5 times) leaves about 0.8 in 100."""
    bad, good = rig.backends["avoid"]
    statuses = rig.statuses("avoid", 100)
    failed = statuses.count(503)
    retries = rig.stat("avoid", "upstream_rq_retry")
    print(f"previous hosts: {failed} of 100 failed; {bad.calls} calls to the bad host, "
          f"{good.calls} to the good one, {retries} retries")
    assert failed <= 8, statuses
    assert 25 <= retries <= 75, retries  # the random balancer did pick the bad host first
    assert good.calls == 100 - failed


def _gaps(backend: ScriptedHttp, tries: int) -> list[float]:
    """The wait between consecutive tries of each request, seen by the backend."""
    times = backend.times
    return [times[i + 1] - times[i] for start in range(0, len(times), tries)
            for i in range(start, start + tries - 1)]


def test_backoff_spaces_the_tries(rig: Retried) -> None:
    """Envoy waits a random time below base_interval x 2^n (at most max_interval)
    before each retry. With 400ms, 10 requests of 3 tries wait 20 x 200ms = 4s in all
    on average (sd 0.5s); with Envoy's default 25ms base, 0.4s on average and never
    more than 0.75s. Both see the same overheads; the bound below is 4 sd under the
    expected difference."""
    for service in ("backoff", "backoff-no"):
        assert rig.statuses(service, 10) == [503] * 10
    [slow], [quick] = rig.backends["backoff"], rig.backends["backoff-no"]
    assert slow.calls == quick.calls == 30
    waited, default = sum(_gaps(slow, 3)), sum(_gaps(quick, 3))
    print(f"backoff: 20 waits took {waited:.2f}s with base 400ms, {default:.2f}s with "
          f"Envoy's default; longest {max(_gaps(slow, 3)):.3f}s")
    assert waited - default >= 1.5, (waited, default)
    assert rig.stat("backoff", "upstream_rq_retry_backoff_exponential") == 20


def test_timeout_covers_every_try(rig: Retried) -> None:
    """Each try takes 200ms and fails; 10 retries would take over 2s. The 700ms
    timeout is the whole request's: a 504 well before."""
    [backend] = rig.backends["deadline"]
    (status, _, _), elapsed = timed(lambda: rig.envoy.request("deadline"))
    print(f"deadline: {status} after {elapsed:.2f}s and {backend.calls} tries")
    assert status == 504
    assert 0.6 <= elapsed < 1.8, elapsed
    assert 2 <= backend.calls <= 4
    wait_for(lambda: backend.active == 0, what="the cut try to end", timeout=5)
