"""The mesh model, `controlplane validate`, and the file source's reload behaviour."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncGenerator
from datetime import timedelta
from pathlib import Path

import pytest

from controlplane.errors import MeshError
from controlplane.mesh import load_mesh_text
from controlplane.mesh.duration import format_duration, parse_duration
from controlplane.mesh.model import Endpoint, Service, ServicePort
from controlplane.sources.file import FileSource

GOOD = """
services:
  - name: reviews
    port: 9080
    endpoints:
      - {address: 127.0.0.1, port: 9081, zone: zone-a, labels: {version: v1}}
      - {address: 127.0.0.1, port: 9082, labels: {version: v2}, ready: false}
    policy:
      timeout: 2s
      retries: {attempts: 3, per_try_timeout: 500ms, on: [5xx, reset, connect-failure]}
      circuit_breaker: {max_connections: 100, max_pending_requests: 10, max_requests: 100}
      outlier_detection: {consecutive_5xx: 5, interval: 10s, base_ejection_time: 30s}
      load_balancer: {policy: round_robin}
      split: [{labels: {version: v1}, weight: 90}, {labels: {version: v2}, weight: 10}]
      fault: {delay: {percent: 10, duration: 100ms}, abort: {percent: 5, status: 503}}
      rate_limit: {requests_per_second: 100, burst: 200}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(MeshError) as info:
        load_mesh_text(text)
    return info.value.problems


def test_design_example_parses_every_policy_field() -> None:
    mesh = load_mesh_text(GOOD)
    [service] = mesh.services
    assert service.namespace == "default" and service.protocol == "http"
    policy = service.policy
    assert policy.timeout == timedelta(seconds=2)
    assert policy.retries is not None and policy.retries.on == ["5xx", "reset", "connect-failure"]
    assert policy.retries.per_try_timeout == timedelta(milliseconds=500)
    assert policy.split is not None and [t.weight for t in policy.split] == [90, 10]
    assert service.endpoints[1].ready is False and service.endpoints[1].is_serving is False


def test_the_readme_mesh_reference_is_a_valid_mesh() -> None:
    """The README's annotated mesh file shows every field: it must also load, so the
    reference cannot drift from the model."""
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "services:" in b]
    assert blocks, "the README lost its mesh file reference"
    policies = [s.policy for block in blocks for s in load_mesh_text(block, "README.md").services]
    assert any(p.match and any(m.path for m in p.match) for p in policies)  # the newest field


def test_every_problem_is_reported_with_its_path_and_object() -> None:
    found = problems("""
services:
  - name: ok
    port: 80
  - name: reviews
    port: 70000
    endpoints: [{address: 127.0.0.1, port: 0}]
    policy: {timeout: -2s, retries: {on: [5xx, sometimes]}, colour: red}
""")
    assert len(found) == 5
    assert found[0].startswith("services[1] (reviews.default).port:")
    assert any(p.startswith("services[1] (reviews.default).endpoints[0].port:") for p in found)
    assert any("policy.timeout: duration '-2s' is negative" in p for p in found)
    assert any(p.startswith("services[1] (reviews.default).policy.retries.on[1]:") for p in found)
    assert any("policy.colour: unknown field" in p for p in found)


def test_duplicates_names_and_yaml_errors() -> None:
    dup = problems("services: [{name: a, port: 1}, {name: a, port: 2}]")
    assert "services[1] (a.default).name: repeats service 'a'" in dup[0]
    assert "DNS label" in problems("services: [{name: Bad_Name, port: 1}]")[0]
    assert "not valid YAML" in problems("services: [")[0]
    assert "top level must be a mapping" in problems("- a\n- b")[0]
    assert "weights add up to 0" in problems(
        "services: [{name: a, port: 1, policy: {split: [{labels: {v: x}, weight: 0}]}}]")[0]


MULTIPORT = """
services:
  - name: api
    ports:
      - {name: http, port: 80, protocol: http}
      - {name: grpc, port: 9090, protocol: grpc}
    endpoints:
      - {address: 10.0.0.7, ports: {http: 8080, grpc: 8090}}
      - {address: 10.0.0.8, ports: {http: 8080}}
  - name: billing
    port: 443
    protocol: tcp
    external_name: billing.example.com
"""


def test_named_ports_and_external_names_parse() -> None:
    api, billing = load_mesh_text(MULTIPORT).services
    assert api.named_ports and [(p.name, p.port, p.protocol) for p in api.service_ports] == \
        [("http", 80, "http"), ("grpc", 9090, "grpc")]
    assert (api.port, api.protocol) == (80, "http")  # the first port's
    grpc = api.service_ports[1]
    assert [e.port_for(grpc) for e in api.endpoints] == [8090, None]
    assert not billing.named_ports and billing.external_name == "billing.example.com"
    [only] = billing.service_ports
    assert (only.name, only.port, only.protocol) == ("", 443, "tcp")
    assert billing.endpoints == []


def test_single_port_form_is_unchanged() -> None:
    [service] = load_mesh_text(GOOD).services
    [only] = service.service_ports
    assert (only.name, only.port, only.protocol) == ("", 9080, "http")
    assert [e.port_for(only) for e in service.endpoints] == [9081, 9082]


def test_services_build_in_python_and_dump_as_mesh_file_keys() -> None:
    """What the Kubernetes source does: the mesh file's keys, as keyword arguments."""
    api = Service(name="api", ports=[ServicePort(name="http", port=80),
                                     ServicePort(name="grpc", port=9090, protocol="grpc")],
                  endpoints=[Endpoint(address="10.0.0.7", ports={"http": 8080})])
    billing = Service(name="billing", port=443, protocol="tcp",
                      external_name="billing.example.com")
    reviews = Service(name="reviews", port=9080,
                      endpoints=[Endpoint(address="10.0.0.5", port=9081)])
    assert (api.port, billing.protocol, reviews.protocol) == (80, "tcp", "http")
    for service in (api, billing, reviews):
        dumped = service.model_dump()
        assert "single_port" not in dumped
        assert Service.model_validate(dumped) == service


@pytest.mark.parametrize(("service", "expected"), [
    ("{name: a, port: 80, ports: [{name: http, port: 80}]}",
     "services[0] (a.default): give port (with protocol) or ports, not both"),
    ("{name: a, protocol: grpc, ports: [{name: http, port: 80}]}",
     "services[0] (a.default): protocol: with ports, each port names its own protocol"),
    ("{name: a}", "services[0] (a.default): port: Field required"),
    ("{name: a, ports: []}", "services[0] (a.default).ports: List should have at least 1"),
    ("{name: a, ports: [{name: http, port: 80}, {name: http, port: 81}]}",
     "services[0] (a.default): ports[1].name: 'http' repeats ports[0]"),
    ("{name: a, ports: [{name: http, port: 80}, {name: web, port: 80}]}",
     "services[0] (a.default): ports[1].port: 80 repeats ports[0]"),
    ("{name: a, ports: [{name: Web_1, port: 80}]}", "port name 'Web_1' must be a DNS label"),
    ("{name: a, port: 80, endpoints: [{address: 10.0.0.1}]}",
     "services[0] (a.default).endpoints[0]: needs port"),
    ("{name: a, port: 80, endpoints: [{address: 10.0.0.1, port: 81, ports: {http: 81}}]}",
     "services[0] (a.default).endpoints[0]: give port (single-port service) or ports"),
    ("{name: a, port: 80, endpoints: [{address: 10.0.0.1, ports: {http: 81}}]}",
     "services[0] (a.default): endpoints[0] (10.0.0.1): needs port; this service has a "
     "single port"),
    ("{name: a, ports: [{name: http, port: 80}], endpoints: [{address: 10.0.0.1, port: 81}]}",
     "services[0] (a.default): endpoints[0] (10.0.0.1): needs ports: {name: port}; this "
     "service's ports are named http"),
    ("{name: a, ports: [{name: http, port: 80}], endpoints: [{address: 10.0.0.1, "
     "ports: {htp: 81}}]}",
     "services[0] (a.default): endpoints[0] (10.0.0.1).ports: 'htp' is not a port of this "
     "service (http)"),
    ("{name: a, port: 443, external_name: b.example.com, endpoints: [{address: 1.2.3.4, "
     "port: 443}]}",
     "services[0] (a.default): endpoints: a service with external_name has none"),
    ("{name: a, port: 443, external_name: Billing.Example.com}",
     "services[0] (a.default).external_name: external_name 'Billing.Example.com' must be a "
     "lower-case DNS name"),
    ("{name: a, port: 443, external_name: 'billing.example.com.'}",
     "must be a lower-case DNS name"),
    ("{name: a, port: 443, external_name: 'http://billing'}", "must be a lower-case DNS name"),
])
def test_port_forms_and_external_name_errors(service: str, expected: str) -> None:
    found = problems(f"services: [{service}]")
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize(("text", "seconds"), [
    ("2s", 2), ("500ms", 0.5), ("1m30s", 90), ("1.5s", 1.5), ("1h", 3600), (3, 3)])
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["-1s", "2 parsecs", "", "1s2", "ms"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_duration_round_trip() -> None:
    assert format_duration(timedelta(milliseconds=250)) == "250ms"
    assert format_duration(timedelta(seconds=90)) == "90s"


def test_validate_command(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text("services:\n  - name: reviews\n    port: 0\n")
    ok = subprocess.run([sys.executable, "-m", "controlplane", "validate", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "ok, 1 service" in ok.stdout
    fail = subprocess.run([sys.executable, "-m", "controlplane", "validate", str(bad)],
                          capture_output=True, text=True)
    assert fail.returncode == 1
    assert "services[0] (reviews.default).port: Input should be greater than or equal to 1" \
        in fail.stderr


async def test_file_source_reloads_and_skips_bad_saves(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("services: [{name: a, port: 80}]")
    source = FileSource(path, poll_interval=0.02)
    updates = source.updates()
    first = await asyncio.wait_for(anext(updates), 2)
    assert [s.name for s in first.services] == ["a"]

    async def next_mesh() -> list[str]:
        mesh = await asyncio.wait_for(anext(updates), 2)
        return [s.name for s in mesh.services]

    path.write_text("services: [{name: a, port: 0}]")  # bad: logged, not yielded
    await asyncio.sleep(0.1)
    path.write_text("services: [{name: a, port: 80}, {name: b, port: 81}]")
    assert await next_mesh() == ["a", "b"]
    path.unlink()  # gone: logged, last mesh stays
    await asyncio.sleep(0.1)
    tmp = tmp_path / "mesh.tmp"
    tmp.write_text("services: [{name: c, port: 82}]")
    tmp.replace(path)  # an editor's atomic save
    assert await next_mesh() == ["c"]
    assert isinstance(updates, AsyncGenerator)  # so it can be closed here
    await updates.aclose()


@pytest.mark.parametrize(("mesh", "message"), [
    ("services: [{name: a, port: 80, policy: {fallback: {service: nope}}}]",
     "services[0] (a.default).policy.fallback.service: no service 'nope' in namespace"),
    ("services: [{name: a, port: 80, policy: {fallback: {service: a}}}]",
     "services[0] (a.default).policy.fallback.service: a service cannot fall back to itself"),
    ("services: [{name: a, port: 80, policy: {fallback: {service: b.x}}},"
     " {name: b, namespace: x, port: 5432, protocol: tcp}]",
     "b.x has no HTTP or gRPC port"),
])
def test_fallback_service_must_exist_and_speak_http(mesh: str, message: str) -> None:
    assert any(message in p for p in problems(mesh))
