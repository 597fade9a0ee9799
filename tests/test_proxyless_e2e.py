"""End to end, proxyless: real grpcio clients with ``xds:///`` targets (each its own
process: gRPC reads ``GRPC_XDS_BOOTSTRAP`` once per process, from ``controlplane
bootstrap --grpc``), the real ``controlplane serve`` on a mesh file, state of the world,
and real grpcio servers on 127.0.0.1 (generic handlers: no generated stubs).

One mesh has every policy feature gRPC supports, and Envoy-only ones on other services
(a rate limit, a fallback): the client's calls follow the routing, and no resource is
NACKed.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.support.procs import ControlPlane, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

METHOD = "/test.Echo/Call"
CALL_ID = "x-call-id"

# The client: runs a plan of calls and prints, per step, how many answers came from
# each backend (by name) or ended with each status ("!UNAVAILABLE"). With "hold", it
# then keeps its channels (and the xDS stream) open until its stdin closes.
CLIENT = r'''
import collections, json, sys, uuid
import grpc
plan = json.loads(sys.argv[1])
channels, results = {}, []
for step in plan["steps"]:
    channel = channels.get(step["target"])
    if channel is None:
        channel = channels[step["target"]] = grpc.insecure_channel(step["target"])
    call = channel.unary_unary(step.get("method", "/test.Echo/Call"))
    seen = collections.Counter()
    for index in range(step["count"]):
        metadata = [tuple(pair) for pair in step.get("metadata", [])]
        metadata.append(("x-call-id", uuid.uuid4().hex))
        try:
            wait = index == 0 and step.get("wait", True)
            answer = call(b"", timeout=step.get("timeout", 15), metadata=metadata,
                          wait_for_ready=wait)
            seen[answer.decode()] += 1
        except grpc.RpcError as error:
            seen["!" + error.code().name] += 1
    results.append(seen)
print(json.dumps(results), flush=True)
if plan.get("hold"):
    sys.stdin.read()
'''


class Backend:
    """A grpcio server answering its name; ``fail_first``: each call's first attempt
    (by its x-call-id) fails with UNAVAILABLE. Counts attempts per call id."""

    def __init__(self, name: str, fail_first: bool = False, delay: float = 0.0) -> None:
        self.name = name
        self.fail_first = fail_first
        self.delay = delay
        self.attempts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        backend = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details: Any) -> Any:
                return grpc.unary_unary_rpc_method_handler(backend.handle)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((Handler(),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def handle(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        call_id = dict(context.invocation_metadata()).get(CALL_ID, "")
        with self._lock:
            self.attempts[call_id] += 1
            first = self.attempts[call_id] == 1
        if self.fail_first and first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the first attempt fails")
        if self.delay:
            time.sleep(self.delay)
        return self.name.encode()

    def stop(self) -> None:
        self.server.stop(0)


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.backends = {name: Backend(name, fail_first=name == "flaky",
                                       delay=3.0 if name == "slow" else 0.0)
                         for name in ("v1", "v2", "details", "flaky", "broken", "limited",
                                      "slow")}
        self.mesh = tmp / "mesh.yaml"
        self.mesh.write_text(yaml.safe_dump(self.mesh_data()))
        self.server = ControlPlane(self.mesh, tmp).start()
        self.bootstrap = tmp / "grpc-bootstrap.json"
        made = subprocess.run(
            [sys.executable, "-m", "controlplane", "bootstrap", "--grpc",
             "--node-id", "grpc-client-1", "--service", "client",
             "--xds-address", f"127.0.0.1:{self.server.xds_port}", "-o", str(self.bootstrap)],
            capture_output=True, text=True, timeout=60, check=False)
        assert made.returncode == 0, made.stderr

    def endpoint(self, name: str, **extra: Any) -> dict[str, Any]:
        return {"address": "127.0.0.1", "port": self.backends[name].port, **extra}

    def mesh_data(self) -> dict[str, Any]:
        return {"services": [
            {"name": "reviews", "port": 9080, "protocol": "grpc",
             "endpoints": [self.endpoint("v1", labels={"version": "v1"}),
                           self.endpoint("v2", labels={"version": "v2"})],
             "policy": {
                 "split": [{"labels": {"version": "v1"}, "weight": 90},
                           {"labels": {"version": "v2"}, "weight": 10}],
                 "match": [{"headers": {"x-user": "tester"}, "labels": {"version": "v2"}}],
                 "timeout": "10s"}},
            {"name": "details", "port": 9084, "protocol": "grpc",
             "endpoints": [self.endpoint("details", zone="zone-a")]},
            {"name": "flaky", "port": 9081, "protocol": "grpc",
             "endpoints": [self.endpoint("flaky")],
             "policy": {"retries": {"attempts": 2, "on": ["5xx"]}}},
            {"name": "broken", "port": 9082, "protocol": "grpc",
             "endpoints": [self.endpoint("broken")],
             "policy": {"fault": {"abort": {"percent": 100, "status": 503}}}},
            {"name": "limited", "port": 9083, "protocol": "http",
             "endpoints": [self.endpoint("limited")],
             "policy": {"rate_limit": {"requests_per_second": 1000, "burst": 1000},
                        "fallback": {"status": 200, "body": "sorry"},
                        "load_balancer": {"policy": "maglev",
                                          "hash": {"cookie": "session"}}}},
            # Two DNS names: no gRPC form (its route is non-forwarding for gRPC).
            {"name": "legacy", "port": 9085, "protocol": "grpc",
             "endpoints": [{"address": f"legacy-{n}.invalid", "address_type": "dns",
                            "port": 9085} for n in (1, 2)]},
            {"name": "slow", "port": 9088, "protocol": "grpc",
             "endpoints": [self.endpoint("slow")], "policy": {"timeout": "500ms"}},
            {"name": "catalog", "port": 9086, "protocol": "grpc",
             "endpoints": [self.endpoint("v1")]},
            {"name": "catalog-v2", "port": 9086, "protocol": "grpc",
             "endpoints": [self.endpoint("v2")]},
            {"name": "echo", "port": 9087, "protocol": "grpc",
             "endpoints": [self.endpoint("details")]},
        ], "grpc_routes": [
            {"name": "catalog-methods",
             "parentRefs": [{"kind": "Service", "name": "catalog", "port": 9086}],
             "rules": [
                 {"matches": [{"method": {"service": "test.Echo", "method": "Special"}}],
                  "backendRefs": [{"name": "catalog-v2", "port": 9086}]},
                 {"backendRefs": [{"name": "catalog", "port": 9086}]}]},
        ], "http_routes": [
            # What gRPC has no use for: left out or failing its own calls, never a NACK.
            {"name": "echo-extras", "parentRefs": [{"kind": "Service", "name": "echo"}],
             "rules": [
                 {"matches": [{"path": {"type": "PathPrefix", "value": "/test.Old"}}],
                  "filters": [{"type": "RequestRedirect",
                               "requestRedirect": {"hostname": "example.org"}}]},
                 {"matches": [{"path": {"type": "PathPrefix", "value": "/test.Half"}}],
                  "backendRefs": [{"name": "echo", "port": 9087, "weight": 1},
                                  {"name": "missing", "port": 9087, "weight": 1}]},
                 {"filters": [
                     {"type": "RequestHeaderModifier",
                      "requestHeaderModifier": {"set": [{"name": "x-a", "value": "b"}]}},
                     {"type": "RequestMirror",
                      "requestMirror": {"backendRef": {"name": "catalog", "port": 9086}}}],
                  "timeouts": {"request": "10s"},
                  "retry": {"attempts": 2, "codes": [503]},
                  "backendRefs": [{"name": "echo", "port": 9087}]}]},
        ]}

    def run(self, steps: list[dict[str, Any]]) -> list[collections.Counter[str]]:
        done = subprocess.run([sys.executable, "-c", CLIENT, json.dumps({"steps": steps})],
                              capture_output=True, text=True, timeout=120, check=False,
                              env=self.env())
        assert done.returncode == 0, done.stderr[-3000:]
        return [collections.Counter(r) for r in json.loads(done.stdout)]

    def env(self) -> dict[str, str]:
        return {**os.environ, "GRPC_XDS_BOOTSTRAP": str(self.bootstrap)}

    def close(self) -> None:
        self.server.stop()
        for backend in self.backends.values():
            backend.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    made = Rig(tmp_path_factory.mktemp("proxyless"))
    try:
        yield made
    finally:
        made.close()


def test_every_name_form_resolves_and_reaches_the_server(rig: Rig) -> None:
    targets = ["details", "details:9084", "details.default", "details.default:9084",
               "details.default.svc", "details.default.svc.cluster.local",
               "details.default.svc.cluster.local:9084"]
    results = rig.run([{"target": f"xds:///{t}", "count": 2} for t in targets])
    assert results == [collections.Counter({"details": 2})] * len(targets)


def test_a_bootstrap_without_kind_is_known_by_its_user_agent(rig: Rig, tmp_path: Path) -> None:
    """A bootstrap written by another tool says nothing of kind: grpcio's user agent
    ("gRPC C-core ...") makes it a gRPC client all the same."""
    data = json.loads(rig.bootstrap.read_text())
    del data["node"]["metadata"]["kind"]
    data["node"]["id"] = "grpc-client-plain"
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(data))
    done = subprocess.run([sys.executable, "-c", CLIENT, json.dumps({"steps": [
        {"target": "xds:///details:9084", "count": 2}]})],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(plain)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == [{"details": 2}]


def test_a_name_the_mesh_does_not_have_fails_unavailable(rig: Rig) -> None:
    """The server's listener answers leave the name out; gRPC takes a name it never had
    as missing when its 15 s does-not-exist timer fires (the call's deadline is longer),
    and the call fails UNAVAILABLE (without wait_for_ready) instead of hanging."""
    [seen] = rig.run([{"target": "xds:///nothing.default:9084", "count": 1, "wait": False,
                       "timeout": 40}])
    assert seen == {"!UNAVAILABLE": 1}


def test_a_90_10_split_lands_within_tolerance(rig: Rig) -> None:
    """500 calls, 10% expected on v2 (50, standard deviation 6.7): 25 to 80 is more
    than 3.5 deviations either way."""
    [seen] = rig.run([{"target": "xds:///reviews:9080", "count": 500}])
    assert set(seen) == {"v1", "v2"}, seen
    assert sum(seen.values()) == 500
    print(f"proxyless 90/10, 500 calls: {seen}")
    assert 25 <= seen["v2"] <= 80, seen


def test_a_header_match_routes(rig: Rig) -> None:
    tester, plain = rig.run([
        {"target": "xds:///reviews:9080", "count": 20, "metadata": [["x-user", "tester"]]},
        {"target": "xds:///reviews:9080", "count": 20, "metadata": [["x-user", "other"]]},
    ])
    assert tester == {"v2": 20}
    assert plain["v1"] >= 10, plain  # 90/10: all 20 on v2 by chance is 1e-20


def test_a_retry_is_observed(rig: Rig) -> None:
    """``retries.on: [5xx]`` retries UNAVAILABLE for a gRPC client: every call's first
    attempt fails, every call succeeds, and the backend saw two attempts of each."""
    flaky = rig.backends["flaky"]
    before = set(flaky.attempts)
    [seen] = rig.run([{"target": "xds:///flaky:9081", "count": 5}])
    assert seen == {"flaky": 5}
    calls = {k: v for k, v in flaky.attempts.items() if k not in before}
    assert len(calls) == 5
    assert set(calls.values()) == {2}


def test_the_policy_timeout_bounds_a_call(rig: Rig) -> None:
    """``timeout: 500ms`` (max_stream_duration for gRPC, gRFC A31) ends a call to a
    backend that takes 3 s: without it the call would succeed (the caller's own
    deadline is 15 s)."""
    [seen] = rig.run([{"target": "xds:///slow:9088", "count": 2}])
    assert seen == {"!DEADLINE_EXCEEDED": 2}


def test_fault_abort_is_the_grpc_status(rig: Rig) -> None:
    """An injected HTTP 503 reaches a gRPC client as UNAVAILABLE (gRFC A33), and the
    call never reaches the backend."""
    broken = rig.backends["broken"]
    [seen] = rig.run([{"target": "xds:///broken:9082", "count": 5}])
    assert seen == {"!UNAVAILABLE": 5}
    assert not broken.attempts


def test_a_grpc_route_method_match_reaches_a_proxyless_client(rig: Rig) -> None:
    """GRPCRouteExactMethodMatching, for a gRPC client instead of a sidecar: the method
    named goes to catalog-v2, any other to catalog."""
    special, other = rig.run([
        {"target": "xds:///catalog:9086", "count": 5, "method": "/test.Echo/Special"},
        {"target": "xds:///catalog:9086", "count": 5, "method": "/test.Echo/Call"},
    ])
    assert special == {"v2": 5}
    assert other == {"v1": 5}


def test_an_http_route_with_filters_gRPC_lacks(rig: Rig) -> None:
    """echo's HTTPRoute has a redirect, a header modifier, a mirror and a backend that
    does not exist: its plain calls succeed, a redirected method fails UNAVAILABLE
    (Envoy would answer the redirect itself; gRPC cannot follow one), and the rule split
    1:1 with the missing backend fails about half its calls, as Envoy answers them 500
    (HTTPRouteInvalidNonExistentBackendRef: 40 calls, 20 expected each way, sd 3.2)."""
    plain, redirected, half = rig.run([
        {"target": "xds:///echo:9087", "count": 3},
        {"target": "xds:///echo:9087", "count": 2, "method": "/test.Old/Call",
         "wait": False},
        {"target": "xds:///echo:9087", "count": 40, "method": "/test.Half/Call",
         "wait": False},
    ])
    assert plain == {"details": 3}
    assert redirected == {"!UNAVAILABLE": 2}
    assert set(half) == {"details", "!UNAVAILABLE"}, half
    assert min(half.values()) >= 8, half


def test_envoy_only_policies_break_nothing_and_nothing_is_nacked(rig: Rig) -> None:
    """limited has a rate limit, a fallback and maglev: the gRPC client still calls
    every service (limited too, without the Envoy-only parts); legacy, which gRPC cannot
    reach, fails its own calls only. While it is connected, the server shows it ACKed
    every type, with no NACK."""
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, json.dumps({"hold": True, "steps": [
            {"target": "xds:///details:9084", "count": 3},
            {"target": "xds:///limited:9083", "count": 3},
            {"target": "xds:///reviews", "count": 3, "metadata": [["x-user", "tester"]]},
            {"target": "xds:///legacy:9085", "count": 2},
            {"target": "xds:///echo.default:9087", "count": 2},
        ]})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=rig.env())
    try:
        assert client.stdout is not None
        line = client.stdout.readline()
        assert line, client.stderr.read() if client.stderr else ""
        assert [collections.Counter(r) for r in json.loads(line)] == [
            {"details": 3}, {"limited": 3}, {"v2": 3}, {"!UNAVAILABLE": 2}, {"details": 2}]
        # grpcio keeps an xDS client (and stream) per channel target: five streams.
        streams = wait_for(lambda: _acked(rig, "grpc-client-1", 5), timeout=20,
                           what="the gRPC client's ACKs")
        listeners = set()
        for stream in streams:
            # (legacy's stream has no clusters to ask for: its route does not forward)
            assert {"lds", "rds"} <= set(stream["types"]) <= {"lds", "rds", "cds", "eds"}
            for kind, state in stream["types"].items():
                assert state["last_nack"] is None, (kind, state["last_nack"])
            listeners.update(stream["types"]["lds"]["subscribed"])
        assert listeners == {"details:9084", "limited:9083", "reviews", "legacy:9085",
                             "echo.default:9087"}
        dump = rig.server.json("/debug/config_dump?node=grpc-client-1")
        assert dump["group"].endswith("~kind=grpc")
        served = json.dumps(dump["resources"])
        assert "grpc-egress" in served and "local_ratelimit" not in served
    finally:
        try:  # closes its stdin: it ends
            client.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            client.kill()
            client.communicate(timeout=10)


def _acked(rig: Rig, node_id: str, streams: int) -> list[dict[str, Any]] | None:
    """The node's streams, once there are ``streams`` and each ACKed what it was sent."""
    found = [p for p in rig.server.json("/debug/proxies") if p["node_id"] == node_id]
    if len(found) != streams or not all(
            p["types"] and all(s["acked_version"] == s["sent_version"] and s["sent_version"]
                               for s in p["types"].values()) for p in found):
        return None
    return found


def test_with_mesh_identity_over_tls_and_a_token(tmp_path: Path) -> None:
    """``serve --ca-dir``: the client's bootstrap (``--grpc --ca-dir``: the CA's bundle,
    a token minted for it) streams xDS over TLS with its token, and its call reaches a
    backend the sidecars would call with mTLS: a gRPC client calls in plaintext (it
    reads no SDS certificates), which the default PERMISSIVE mode accepts."""
    backend = Backend("secured")
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(yaml.safe_dump({"services": [
        {"name": "ratings", "port": 9080, "protocol": "grpc", "service_accounts": ["ratings"],
         "endpoints": [{"address": "127.0.0.1", "port": backend.port,
                        "service_account": "ratings"}]}]}))
    server = ControlPlane(mesh, tmp_path, extra=["--ca-dir", str(tmp_path / "ca")]).start()
    try:
        bootstrap = tmp_path / "client.json"
        made = subprocess.run(
            [sys.executable, "-m", "controlplane", "bootstrap", "--grpc",
             "--node-id", "client-1.default", "--service", "client",
             "--service-account", "client", "--ca-dir", str(tmp_path / "ca"),
             "--xds-address", f"127.0.0.1:{server.xds_port}", "-o", str(bootstrap)],
            capture_output=True, text=True, timeout=60, check=False)
        assert made.returncode == 0, made.stderr
        assert bootstrap.with_suffix(".token").exists()
        done = subprocess.run(
            [sys.executable, "-c", CLIENT, json.dumps({"steps": [
                {"target": "xds:///ratings:9080", "count": 3}]})],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap),
                 "GRPC_EXPERIMENTAL_XDS_BOOTSTRAP_CALL_CREDS": "true"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout) == [{"secured": 3}]
    finally:
        server.stop()
        backend.stop()
