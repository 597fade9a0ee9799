"""Validation is Envoy's, not looser: each value a real Envoy (or the server) would choke
on is a clean MeshError whose text names the path, never another exception."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from controlplane.errors import EmptyMeshError, MeshError
from controlplane.mesh import load_mesh_text
from controlplane.mesh.duration import MAX_DURATION, parse_duration
from controlplane.mesh.loader import MAX_VALUES, load_mesh_bytes
from controlplane.mesh.model import RateLimit
from controlplane.proxy import ProxyIdentity
from controlplane.translator import translate
from controlplane.translator.policies.rate_limit import fill, token_bucket
from tests.support.envoy_validate import rejected

SVC = "services[0] (a.default)"


def problems(text: str) -> list[str]:
    with pytest.raises(MeshError) as info:
        load_mesh_text(text)
    return info.value.problems


def one_problem(service: str) -> str:
    found = problems(f"services:\n  - {service}\n")
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(("policy", "path", "words"), [
    ("{timeout: .inf}", "policy.timeout", "infinite"),
    ("{timeout: -.inf}", "policy.timeout", "negative"),
    ("{timeout: .nan}", "policy.timeout", "not a number"),
    ("{timeout: 9999999999999h}", "policy.timeout", "8760h (365 days)"),
    ("{timeout: 100000000h}", "policy.timeout", "Envoy refuses"),
    ("{timeout: 1.0e+400}", "policy.timeout", "infinite"),
    ("{timeout: 1e400}", "policy.timeout", "not understood"),  # a string in YAML 1.1
    (f"{{timeout: {10**30}}}", "policy.timeout", "longer than the maximum"),
    ("{timeout: 8761h}", "policy.timeout", "longer than the maximum"),
    ("{retries: {per_try_timeout: 99999999999999999999s}}", "policy.retries.per_try_timeout",
     "longer than the maximum"),
    ("{outlier_detection: {interval: 1000000h}}", "policy.outlier_detection.interval",
     "longer than the maximum"),
    ("{fault: {delay: {percent: 1, duration: 400d}}}", "policy.fault.delay.duration",
     "not understood"),
    ("{circuit_breaker: {max_connections: 99999999999}}",
     "policy.circuit_breaker.max_connections",
     "less than or equal to 4294967295 (Envoy keeps it in 32 bits)"),
    ("{circuit_breaker: {max_requests: true}}", "policy.circuit_breaker.max_requests",
     "true is a boolean; give a number"),
    ("{outlier_detection: {consecutive_5xx: 4294967296}}",
     "policy.outlier_detection.consecutive_5xx", "4294967295"),
    ("{retries: {attempts: true}}", "policy.retries.attempts", "is a boolean"),
    ("{retries: {budget: {percent: .nan}}}", "policy.retries.budget.percent", "finite"),
    ("{fault: {abort: {percent: .inf, status: 503}}}", "policy.fault.abort.percent", "finite"),
    ("{fault: {abort: {percent: 5, status: 503.5}}}", "policy.fault.abort.status",
     "valid integer"),
    ("{load_balancer: {policy: ring_hash, hash: {header: \"x-user\\nx-evil: 1\"}}}",
     "policy.load_balancer.hash.header", "token characters"),
    ("{load_balancer: {policy: ring_hash, hash: {cookie: \"a=b\"}}}",
     "policy.load_balancer.hash.cookie", "cookie name"),
    ("{fallback: {content_type: \"text/plain\\r\\nset-cookie: x\"}}",
     "policy.fallback.content_type", "line break"),
    ("{fallback: {body: " + "x" * 70000 + "}}", "policy.fallback.body", "at most"),
    ("{match: [{headers: {x-canary: \"a\\nb\"}, labels: {v: x}}]}",
     "policy.match[0].headers.x-canary", "line break"),
    ("{match: [{path: {prefix: \"/a\\u0000\"}, labels: {v: x}}]}",
     "policy.match[0].path.prefix", "must start with '/'"),
    ("{split: [{labels: {\"version\\n\": v1}, weight: 1}]}", "policy.split[0].labels",
     "label key"),
    ("{split: [{labels: {version: \"v 1\"}, weight: 1}]}", "policy.split[0].labels.version",
     "label value"),
    ("{rate_limit: {requests_per_second: 1.0e+30}}", "policy.rate_limit.requests_per_second",
     "less than or equal to 1000000"),
    ("{rate_limit: {requests_per_second: .nan}}", "policy.rate_limit.requests_per_second",
     "finite"),
    ("{rate_limit: {requests_per_second: true}}", "policy.rate_limit.requests_per_second",
     "is a boolean"),
])
def test_a_policy_value_envoy_would_refuse_is_an_error_naming_its_path(
    policy: str, path: str, words: str
) -> None:
    found = one_problem(f"{{name: a, port: 80, policy: {policy}}}")
    assert found.startswith(f"{SVC}.{path}"), found
    assert words in found, found


@pytest.mark.parametrize(("endpoint", "path", "words"), [
    ("{address: not-an-ip, port: 81}", "endpoints[0].address", "not an IP address"),
    ("{address: localhost, port: 81}", "endpoints[0].address", "address_type: dns"),
    ("{address: 256.1.1.1, port: 81}", "endpoints[0].address", "not an IP address"),
    ("{address: 'fe80::1%eth0', port: 81}", "endpoints[0].address", "not an IP address"),
    ("{address: '10.0.0.1 ', port: 81}", "endpoints[0].address", "not an IP address"),
    ("{address: 10.0.0.1, port: true}", "endpoints[0].port", "true is a boolean"),
    ("{address: 10.0.0.1, port: 81.0}", "endpoints[0].port", "valid integer"),
    ("{address: 10.0.0.1, port: '81'}", "endpoints[0].port", "valid integer"),
    ("{address: 10.0.0.1, port: 81, zone: \"a\\nb\"}", "endpoints[0].zone", "label value"),
    ("{address: 10.0.0.1, port: 81, labels: {version: \"" + "v" * 64 + "\"}}",
     "endpoints[0].labels.version", "at most 63"),
    ("{address: Not_A.Host, address_type: dns, port: 81}", "endpoints[0].address",
     "lower-case DNS name"),
    ("{address: db.example.com, address_type: srv, port: 81}", "endpoints[0].address_type",
     "'ip' or 'dns'"),
])
def test_an_endpoint_value_envoy_would_refuse_is_an_error_naming_its_path(
    endpoint: str, path: str, words: str
) -> None:
    found = one_problem(f"{{name: a, port: 80, endpoints: [{endpoint}]}}")
    assert found.startswith(f"{SVC}.{path}"), found
    assert words in found, found


def test_ports_are_integers_never_booleans() -> None:
    assert one_problem("{name: a, port: true}") == f"{SVC}.port: true is a boolean; give a number"
    assert "false is a boolean" in one_problem("{name: a, ports: [{name: http, port: false}]}")


def test_ip_addresses_of_both_families_and_dns_names_are_accepted() -> None:
    mesh = load_mesh_text("""
services:
  - name: a
    port: 80
    endpoints: [{address: 10.0.0.1, port: 81}, {address: 'fd00::7', port: 81}]
  - name: b
    port: 80
    endpoints: [{address: db.example.com, address_type: dns, port: 5432}]
""")
    a, b = mesh.services
    assert not a.resolves_dns and b.resolves_dns


def test_a_service_mixing_ips_and_dns_names_is_refused() -> None:
    found = one_problem("{name: a, port: 80, endpoints: [{address: 10.0.0.1, port: 81}, "
                        "{address: db.example.com, address_type: dns, port: 81}]}")
    assert found.startswith(f"{SVC}: endpoints: mixes IP addresses and DNS names"), found


def test_a_repeated_key_is_an_error_naming_both_lines() -> None:
    [found] = problems("services:\n  - name: a\n    port: 80\n    port: 81\n")
    assert found.startswith("line 4, column 5: not valid YAML: key 'port' repeats the one on "
                            "line 3"), found
    [top] = problems("services: []\nservices: []\n")
    assert "key 'services' repeats the one on line 1" in top


def test_yaml_merge_keys_are_not_repeats() -> None:
    mesh = load_mesh_text("services:\n  - &a {name: a, port: 80}\n  - {<<: *a, name: b}\n")
    assert [s.name for s in mesh.services] == ["a", "b"]


@pytest.mark.parametrize(("data", "words"), [
    (b"services:\n  - name: a\xff\n", "line 2, byte 12 of the line (offset 21): byte 0xff"),
    (b"\xfe\xff", "line 1, byte 1"),
    (b"services: []\n\n\n# caf\xe9\n", "line 4, byte 6"),
])
def test_non_utf8_bytes_are_an_error_naming_line_and_byte(data: bytes, words: str) -> None:
    with pytest.raises(MeshError) as info:
        load_mesh_bytes(data, origin="mesh.yaml")
    [found] = info.value.problems
    assert words in found and "save the file as UTF-8" in found, found


@pytest.mark.parametrize("text", ["", "  \n", "# nothing\n", "{}", "other: 1"])
def test_a_mesh_without_services_is_not_a_mesh_of_no_services(text: str) -> None:
    with pytest.raises(EmptyMeshError) as info:
        load_mesh_text(text)
    assert "services: []" in info.value.problems[0]
    assert load_mesh_text("services: []").services == []


def test_deep_nesting_and_alias_bombs_are_clean_errors() -> None:
    with pytest.raises(MeshError):
        load_mesh_text("services: " + "[" * 5000 + "]" * 5000)
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        below = "a" if level == 1 else f"l{level - 1}"
        bomb.append(f"l{level}: &l{level} [{', '.join([f'*{below}'] * 10)}]")
    bomb.append("services: []")
    with pytest.raises(MeshError) as info:
        load_mesh_text("\n".join(bomb))
    assert f"more than {MAX_VALUES:,} values" in info.value.problems[0]


def test_field_and_reference_errors_are_reported_in_one_round() -> None:
    """`controlplane validate` lists every problem at once: a split to a missing service
    is reported beside a bad port, not only after the port is fixed. A reference to a
    service that is itself invalid is not reported as missing."""
    found = problems("""
services:
  - name: a
    port: 0
  - name: b
    port: 80
    policy: {split: [{service: nope, weight: 1}, {service: a, weight: 1}]}
  - name: c
    port: 80
    policy: {fallback: {service: ghost}}
  - name: d
    port: true
    policy: {split: [{service: nope, weight: 1}, {service: b, weight: 1}]}
""")
    assert any(p.startswith("services[0] (a.default).port:") for p in found), found
    assert any(p.startswith("services[1] (b.default).policy.split[0].service: no service "
                            "'nope'") for p in found), found
    assert any(p.startswith("services[2] (c.default).policy.fallback.service: no service "
                            "'ghost'") for p in found), found
    assert any(p.startswith("services[3] (d.default).port: true is a boolean") for p in found)
    assert any(p.startswith("services[3] (d.default).policy.split[0].service: no service "
                            "'nope'") for p in found), found
    assert not any("split[1]" in p for p in found), found
    assert len(found) == 5, found


def test_validate_command_lists_both_kinds_at_once(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services:\n  - {name: a, port: true}\n"
                    "  - {name: b, port: 80, policy: {split: [{service: nope, weight: 1}]}}\n")
    run = subprocess.run([sys.executable, "-m", "controlplane", "validate", str(mesh)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "services[0] (a.default).port" in run.stderr
    assert "services[1] (b.default).policy.split[0].service: no service 'nope'" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 10**400, "1" + "0" * 100 + "h",
                                   "9" * 70 + "s", timedelta(days=366)])
def test_parse_duration_only_ever_raises_value_error(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)
    assert parse_duration("8760h") == MAX_DURATION


# --- rate limiting: O(1), exact or within a microsecond per fill, burst honoured ----------


@pytest.mark.parametrize("rate", [12345.677, 999999.999, 0.001, 33.333, 1_000_000, 7.5])
def test_any_accepted_rate_translates_at_once_and_keeps_the_burst(rate: float) -> None:
    """12345.677 rps used to take the translator 114 s (a loop per unit of the rate's
    numerator) and hold a bucket of 12 million tokens whatever the burst."""
    burst = max(1, round(rate))
    bucket = token_bucket(RateLimit(requests_per_second=rate, burst=burst))
    interval = bucket.fill_interval.seconds + bucket.fill_interval.nanos / 1e9
    assert interval >= 0.05
    assert bucket.tokens_per_fill.value / interval == pytest.approx(rate, rel=2e-5)
    assert bucket.max_tokens == max(burst, bucket.tokens_per_fill.value)
    assert bucket.tokens_per_fill.value <= max(burst, rate / 20 + 1)


def test_a_decimal_rate_is_exact_when_the_burst_allows() -> None:
    assert fill(2.5) == (1, timedelta(milliseconds=400))
    tokens, interval = fill(12345.677)  # no bucket size given: the exact fill
    assert (tokens, interval) == (12345677, timedelta(seconds=1000))
    assert fill(12345.677, 20000) == (618, timedelta(microseconds=50058))


def test_the_limits_themselves_are_accepted_by_a_real_envoy() -> None:
    """Each maximum the model allows, and the characters it lets through, pass a real
    Envoy: the bounds are Envoy's, not looser (and not needlessly tighter)."""
    mesh = load_mesh_text(f"""
services:
  - name: a
    port: 65535
    endpoints:
      - {{address: 'fd00::7', port: 1, zone: {"z" * 63}, labels: {{version: {"v" * 63}}}}}
    policy:
      timeout: 8760h
      retries: {{attempts: 100, per_try_timeout: 8760h,
                backoff: {{base_interval: 1us, max_interval: 8760h}},
                budget: {{percent: 100, min_concurrency: 4294967295}}}}
      circuit_breaker: {{max_connections: 4294967295, max_pending_requests: 4294967295,
                        max_requests: 4294967295, max_retries: 4294967295}}
      outlier_detection: {{consecutive_5xx: 4294967295, interval: 8760h,
                          base_ejection_time: 8760h, max_ejection_percent: 100}}
      load_balancer: {{policy: ring_hash, hash: {{cookie: "a!#$%&'*+-.^_`|~z",
                                                 cookie_ttl: 8760h}}}}
      match: [{{headers: {{"x-a!#$%&'*+-.^_`|~": "50% of \\"all\\" %REQ(x)%"}},
               path: {{prefix: "/{"p" * 1000}"}}, labels: {{version: {"v" * 63}}}}}]
      fault: {{delay: {{percent: 100, duration: 8760h}}, abort: {{percent: 0.0001, status: 599}}}}
      rate_limit: {{requests_per_second: 12345.677, burst: 1000000000}}
      fallback: {{status: 599, body: "{"b" * 65536}", content_type: "text/plain; q=100%"}}
  - name: b
    port: 80
    endpoints: [{{address: db.example.com, address_type: dns, port: 5432}}]
""")
    proxy = ProxyIdentity(node_id="edge-1", service="a", inbound_port=15006, app_port=8080)
    assert rejected([translate(mesh, proxy)]) == {}


def test_an_invalid_leg_is_not_also_reported_as_a_missing_service() -> None:
    [found] = problems("services: [{name: a, port: 80, policy: {split: "
                       "[{labels: {v: x}, service: ghost, weight: 1}]}}]")
    assert found.startswith(f"{SVC}.policy.split[0]: give labels"), found
