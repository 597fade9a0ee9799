"""Resilience through real Envoy: retries, timeouts, circuit breaking, outlier detection,
and the retry budget; and the precise errors a bad resilience policy gets.

The Envoy tests share one control plane and one sidecar (module scope), with a service
per behaviour, each backed by its own scripted backend: no test sees another's traffic.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from controlplane.errors import MeshError
from controlplane.mesh import load_mesh_text
from tests.support.procs import Envoy, wait_for
from tests.support.promise_servers import Behaviour
from tests.support.promise_servers import ScriptedHttp as Scripted
from tests.test_e2e import Lab

# Every test here is bounded: a hung Envoy or backend fails the test, not the suite.
pytestmark = pytest.mark.timeout(180)


def fail_first(count: int) -> Behaviour:
    return lambda n: (503, 0.0) if n <= count else (200, 0.0)


def always(status: int, delay: float = 0.0) -> Behaviour:
    return lambda n: (status, delay)


def slow_first(delay: float) -> Behaviour:
    return lambda n: (200, delay) if n == 1 else (200, 0.0)


# name -> (backends, policy). Each service is one behaviour under test.
QUICK_BACKOFF = {"base_interval": "10ms", "max_interval": "50ms"}
SERVICES: dict[str, tuple[list[Behaviour], dict[str, Any]]] = {
    "flaky": ([fail_first(2)], {"retries": {"attempts": 2, "on": ["5xx"]}}),
    "flaky-bare": ([fail_first(2)], {}),
    "slow": ([always(200, 2.0)], {"timeout": "500ms"}),
    "slow-once": ([slow_first(2.0)], {
        "timeout": "3s", "retries": {"attempts": 2, "per_try_timeout": "300ms", "on": ["5xx"]}}),
    "guarded": ([always(200, 1.0)], {"circuit_breaker": {
        "max_connections": 1, "max_pending_requests": 1, "max_requests": 1}}),
    "shaky": ([always(503), always(200)], {"outlier_detection": {
        "consecutive_5xx": 3, "interval": "1s", "base_ejection_time": "30s",
        "max_ejection_percent": 50}}),
    "budgeted": ([always(503, 0.3)], {"retries": {
        "attempts": 3, "on": ["5xx"], "backoff": QUICK_BACKOFF,
        "budget": {"percent": 10, "min_concurrency": 1}}}),
    "unbudgeted": ([always(503, 0.3)], {"retries": {
        "attempts": 3, "on": ["5xx"], "backoff": QUICK_BACKOFF}}),
}


@dataclass
class Rig:
    lab: Lab
    envoy: Envoy
    backends: dict[str, list[Scripted]]

    def stat(self, service: str, name: str) -> int:
        return self.envoy.stat(f"cluster.outbound|9080||{service}.default.svc.cluster.local.{name}")

    def timed(self, service: str) -> tuple[int, float, dict[str, str]]:
        start = time.monotonic()
        status, _, headers = self.envoy.request(service)
        return status, time.monotonic() - start, headers


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    lab = Lab(tmp_path_factory.mktemp("resilience"))
    backends = {name: [Scripted(f"{name}-{i}", b) for i, b in enumerate(behaviours)]
                for name, (behaviours, _) in SERVICES.items()}
    ready = lab.backend("ready")
    try:
        mesh = {"services": [
            {"name": name, "port": 9080, "policy": policy,
             "endpoints": [{"address": "127.0.0.1", "port": b.port} for b in backends[name]]}
            for name, (_, policy) in SERVICES.items()
        ] + [{"name": "ready", "port": 9080,
              "endpoints": [{"address": "127.0.0.1", "port": ready.port}]}]}
        lab.mesh.write_text(yaml.safe_dump(mesh))
        lab.serve()
        envoy = lab.envoy("frontend-1", delta=False)
        wait_for(lambda: envoy.request("ready")[0] == 200, what="the mesh routed")
        result = Rig(lab, envoy, backends)
        # Endpoints known everywhere, without sending a request that a test counts.
        wait_for(lambda: all(result.stat(name, "membership_healthy") == len(members)
                             for name, members in backends.items()), what="every endpoint")
        yield result
    finally:
        lab.close()
        for members in backends.values():
            for backend in members:
                backend.stop()


def _flood(envoy: Envoy, service: str, count: int) -> list[tuple[int, dict[str, str]]]:
    def one(_: int) -> tuple[int, dict[str, str]]:
        status, _, headers = envoy.request(service)
        return status, headers

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


@pytest.mark.e2e
def test_envoy_accepts_every_resilience_setting(rig: Rig) -> None:
    """Envoy takes every resilience setting at once: no NACK, and they are in its
    running config. (What each does to traffic: the tests below, and
    tests/test_promises_retries.py for back-off and previous-host avoidance.)"""
    assert rig.lab.server is not None
    [proxy] = [p for p in rig.lab.server.json("/debug/proxies") if p["node_id"] == "frontend-1"]
    for kind in ("cds", "rds"):
        assert proxy["types"][kind]["acked_version"], kind
        assert proxy["types"][kind]["last_nack"] is None, kind
    _, dump, _ = rig.envoy.admin("/config_dump")
    for text in ("retry_budget", "retry_back_off", "envoy.retry_host_predicates.previous_hosts",
                 "PreviousHostsPredicate", "host_selection_retry_max_attempts"):
        assert text in dump, text


@pytest.mark.e2e
def test_retries_hide_early_failures(rig: Rig) -> None:
    [flaky], [bare] = rig.backends["flaky"], rig.backends["flaky-bare"]
    assert rig.envoy.request("flaky")[0] == 200  # 503, 503, then 200: two retries
    assert flaky.calls == 3
    assert rig.stat("flaky", "upstream_rq_retry") == 2
    assert rig.envoy.request("flaky-bare")[0] == 503  # no retries: the first 503 is final
    assert bare.calls == 1


@pytest.mark.e2e
def test_timeout_cuts_a_slow_backend(rig: Rig) -> None:
    status, elapsed, _ = rig.timed("slow")  # the backend takes 2 s; the timeout is 500ms
    print(f"timeout: {status} after {elapsed:.2f}s")
    assert status == 504
    assert 0.45 <= elapsed < 1.5, elapsed
    assert rig.stat("slow", "upstream_rq_timeout") >= 1


@pytest.mark.e2e
def test_per_try_timeout_retries_a_slow_try(rig: Rig) -> None:
    [backend] = rig.backends["slow-once"]
    status, elapsed, _ = rig.timed("slow-once")  # try 1 hangs 2 s, cut at 300ms; try 2 is fast
    print(f"per-try timeout: {status} after {elapsed:.2f}s, {backend.calls} backend calls")
    assert status == 200
    assert 0.25 <= elapsed < 1.5, elapsed
    assert backend.calls == 2
    assert rig.stat("slow-once", "upstream_rq_per_try_timeout") == 1


@pytest.mark.e2e
def test_circuit_breaker_sheds_a_flood(rig: Rig) -> None:
    [backend] = rig.backends["guarded"]
    results = _flood(rig.envoy, "guarded", 20)  # 1 in flight + 1 pending allowed; each 1 s
    ok = sum(status == 200 for status, _ in results)
    shed = [headers for status, headers in results if status == 503]
    print(f"circuit breaker: {ok} ok, {len(shed)} shed, overflow stat "
          f"{rig.stat('guarded', 'upstream_rq_pending_overflow')}")
    assert 1 <= ok <= 3 and ok + len(shed) == 20, results
    assert all(h.get("x-envoy-overloaded") == "true" for h in shed)
    assert backend.peak == 1
    assert rig.stat("guarded", "upstream_rq_pending_overflow") == len(shed)


@pytest.mark.e2e
def test_outlier_detection_ejects_the_failing_host(rig: Rig) -> None:
    bad, good = rig.backends["shaky"]
    sent = 0
    while rig.stat("shaky", "outlier_detection.ejections_enforced_total") < 1:
        assert sent < 30, "no ejection after 30 requests"
        rig.envoy.request("shaky")
        sent += 1
    print(f"outlier: ejected after {sent} requests")
    assert bad.calls == 3  # ejected on its third 5xx in a row
    calls_before = good.calls
    assert [rig.envoy.request("shaky")[0] for _ in range(20)] == [200] * 20
    assert bad.calls == 3 and good.calls == calls_before + 20
    assert rig.stat("shaky", "outlier_detection.ejections_active") == 1


@pytest.mark.e2e
def test_retry_budget_caps_retry_amplification(rig: Rig) -> None:
    """Ten clients hit an always-503 backend with 3 retries each: without a budget it
    sees 10 x 4 = 40 calls; with 10% (at least 1 retry in flight), far fewer."""
    [capped], [uncapped] = rig.backends["budgeted"], rig.backends["unbudgeted"]
    assert [s for s, _ in _flood(rig.envoy, "unbudgeted", 10)] == [503] * 10
    assert [s for s, _ in _flood(rig.envoy, "budgeted", 10)] == [503] * 10
    print(f"budget: {capped.calls} calls with it, {uncapped.calls} without; overflow "
          f"{rig.stat('budgeted', 'upstream_rq_retry_overflow')}")
    # The backend counts a call as it answers; the last answers may still be counting.
    wait_for(lambda: uncapped.calls == 40, timeout=5, what=f"40 calls (got {uncapped.calls})")
    assert rig.stat("unbudgeted", "upstream_rq_retry_overflow") == 0
    assert capped.calls < 30, capped.calls
    assert rig.stat("budgeted", "upstream_rq_retry_overflow") >= 5


def problems(policy: str) -> list[str]:
    with pytest.raises(MeshError) as info:
        load_mesh_text(f"services: [{{name: a, port: 80, policy: {policy}}}]")
    return info.value.problems


@pytest.mark.parametrize(("policy", "expected"), [
    ("{retries: {per_try_timeout: -1s}}",
     "services[0] (a.default).policy.retries.per_try_timeout: duration '-1s' is negative"),
    ("{retries: {per_try_timeout: 0s}}",
     "services[0] (a.default).policy.retries.per_try_timeout: must be longer than 0"),
    ("{retries: {attempts: -1}}",
     "services[0] (a.default).policy.retries.attempts: Input should be greater than or equal"),
    ("{retries: {backoff: {base_interval: 1s, max_interval: 100ms}}}",
     "services[0] (a.default).policy.retries.backoff: max_interval 100ms is shorter than "
     "base_interval 1s"),
    ("{retries: {backoff: {base_interval: 0ms}}}",
     "services[0] (a.default).policy.retries.backoff.base_interval: must be longer than 0"),
    ("{retries: {backoff: {max_interval: 1s}}}",
     "services[0] (a.default).policy.retries.backoff.base_interval: Field required"),
    ("{retries: {backoff: {base: 1s, base_interval: 1s}}}",
     "services[0] (a.default).policy.retries.backoff.base: unknown field"),
    ("{retries: {budget: {percent: 120}}}",
     "services[0] (a.default).policy.retries.budget.percent: Input should be less than or "
     "equal to 100"),
    ("{retries: {budget: {percent: -5}}}",
     "services[0] (a.default).policy.retries.budget.percent: Input should be greater than or "
     "equal to 0"),
    ("{retries: {budget: {percent: 20, min_concurrency: 0}}}",
     "services[0] (a.default).policy.retries.budget.min_concurrency: Input should be greater "
     "than or equal to 1"),
    ("{circuit_breaker: {max_connections: 0}}",
     "services[0] (a.default).policy.circuit_breaker.max_connections: Input should be greater"),
    ("{circuit_breaker: {max_pending_requests: -3}}",
     "services[0] (a.default).policy.circuit_breaker.max_pending_requests: Input should be "
     "greater"),
    ("{outlier_detection: {interval: 0s}}",
     "services[0] (a.default).policy.outlier_detection.interval: must be longer than 0"),
    ("{outlier_detection: {base_ejection_time: -30s}}",
     "services[0] (a.default).policy.outlier_detection.base_ejection_time: duration '-30s' "
     "is negative"),
    ("{outlier_detection: {max_ejection_percent: 101}}",
     "services[0] (a.default).policy.outlier_detection.max_ejection_percent: Input should be "
     "less than or equal to 100"),
    ("{outlier_detection: {consecutive_5xx: 0}}",
     "services[0] (a.default).policy.outlier_detection.consecutive_5xx: Input should be "
     "greater than or equal to 1"),
])
def test_bad_resilience_settings_are_named_by_path(policy: str, expected: str) -> None:
    found = problems(policy)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found


def test_good_resilience_settings_load() -> None:
    mesh = load_mesh_text("""
services:
  - name: a
    port: 80
    policy:
      retries:
        attempts: 2
        backoff: {base_interval: 25ms, max_interval: 25ms}
        budget: {percent: 0}
""")
    retries = mesh.services[0].policy.retries
    assert retries is not None and retries.budget is not None and retries.backoff is not None
    assert retries.budget.min_concurrency == 3  # Envoy's default, made explicit
    assert retries.backoff.max_interval == retries.backoff.base_interval
