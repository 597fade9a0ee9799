"""``policy.connect_timeout`` and ``policy.idle_timeout`` (issue 10, item 3), as Istio's
DestinationRule connectionPool.tcp.connectTimeout and idleTimeout: read and refused
with errors naming the service and field, and where the translator puts them. The
goldens (tests/testdata/translator/in/capture_tcp_policy.yaml) show the whole output;
tests/test_tcp_policy_e2e.py sends real traffic through a real captured sidecar."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import jsonschema
import pytest
import yaml
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from pydantic import ValidationError

from controlplane import resource
from controlplane.errors import MeshError
from controlplane.mesh import Mesh, load_mesh_text
from controlplane.mesh.policy import Policy
from controlplane.proxy import ProxyIdentity
from controlplane.translator import translate

CAPTURED = ProxyIdentity(node_id="a-1.default", service="a", capture=True)
PLAIN = ProxyIdentity(node_id="a-1.default", service="a")
ECHO = "outbound|7000||echo.default.svc.cluster.local"
ROOT = Path(__file__).resolve().parent.parent


def _mesh(policy: str, extra: str = "", top: str = "") -> Mesh:
    return load_mesh_text(f"""{top}services:
  - name: echo
    port: 7000
    protocol: tcp
    cluster_ips: [10.96.0.20]
    endpoints: [{{address: 10.1.0.5, port: 7000}}]
    policy: {policy}
  - name: other
    port: 7001
    protocol: tcp
    cluster_ips: [10.96.0.21]
    endpoints: [{{address: 10.1.0.6, port: 7001}}]
{extra}""")


def _problems(policy: str) -> list[str]:
    with pytest.raises(MeshError) as caught:
        _mesh(policy)
    return caught.value.problems


def _connect_timeouts(mesh: Mesh, proxy: ProxyIdentity = CAPTURED) -> dict[str, float]:
    return {c.name: c.connect_timeout.ToTimedelta().total_seconds()
            for c in translate(mesh, proxy)[resource.CLUSTER]}


def _idle_timeouts(mesh: Mesh) -> dict[str, timedelta]:
    """Each tcp_proxy chain of the captured egress listener: its idle timeout."""
    [egress] = [m for m in translate(mesh, CAPTURED)[resource.LISTENER] if m.name == "egress"]
    assert isinstance(egress, listener_pb2.Listener)
    found = {}
    for chain in [*egress.filter_chains, egress.default_filter_chain]:
        config = tcp_proxy_pb2.TcpProxy()
        if chain.filters[0].typed_config.Unpack(config):
            found[chain.name] = config.idle_timeout.ToTimedelta()
    return found


def test_both_fields_are_read_and_written_back_as_given() -> None:
    [echo, other] = _mesh("{connect_timeout: 250ms, idle_timeout: 0s}").services
    assert echo.policy.connect_timeout == timedelta(milliseconds=250)
    assert echo.policy.idle_timeout == timedelta(0)  # never, as in Envoy
    assert echo.policy.model_dump(mode="json", exclude_none=True) == {
        "connect_timeout": "250ms", "idle_timeout": "0s"}
    assert other.policy.connect_timeout is None and other.policy.idle_timeout is None


@pytest.mark.parametrize(("policy", "field", "words"), [
    ("{connect_timeout: 0s}", "connect_timeout", "at least 1ms"),
    ("{connect_timeout: 500us}", "connect_timeout", "at least 1ms"),
    ("{connect_timeout: -1s}", "connect_timeout", "negative"),
    ("{connect_timeout: soon}", "connect_timeout", "not understood"),
    ("{connect_timeout: 9000h}", "connect_timeout", "longer than the maximum"),
    ("{idle_timeout: 500us}", "idle_timeout", "0 (never close an idle connection) or at least"),
    ("{idle_timeout: -5m}", "idle_timeout", "negative"),
    ("{idle_timeout: 9000h}", "idle_timeout", "longer than the maximum"),
    ("{idle_timeout: true}", "idle_timeout", "boolean"),
])
def test_a_bad_value_is_refused_naming_the_service_and_field(policy: str, field: str,
                                                             words: str) -> None:
    [problem] = _problems(policy)
    assert f"services[0] (echo.default).policy.{field}:" in problem, problem
    assert words in problem, problem


def test_connect_timeout_is_on_every_cluster_of_the_service_and_only_its() -> None:
    mesh = _mesh("{connect_timeout: 2500ms, split: [{labels: {v: a}, weight: 1}]}",
                 extra="""  - {name: web, port: 80, policy: {connect_timeout: 3s,
       split: [{labels: {v: a}, weight: 1}]}}
  - {name: api, port: 443, protocol: tcp, external_name: api.example.com,
     policy: {connect_timeout: 4s}}
""")
    found = _connect_timeouts(mesh)
    assert found[ECHO] == 2.5
    assert found["outbound|80||web.default.svc.cluster.local"] == 3
    assert found["outbound|80|v=a|web.default.svc.cluster.local"] == 3  # its subsets too
    assert found["outbound|443||api.default.svc.cluster.local"] == 4  # a DNS cluster
    assert found["outbound|7001||other.default.svc.cluster.local"] == 1  # the default
    assert found["passthrough"] == 1 and found["blackhole"] == 1  # not a service's
    assert _connect_timeouts(mesh, PLAIN)[ECHO] == 2.5  # a sidecar without capture too


def test_idle_timeout_is_on_the_services_captured_tcp_chains_only() -> None:
    mesh = _mesh("{idle_timeout: 30s}", extra="""  - name: db
    port: 5432
    protocol: tcp
    endpoints: [{address: 10.1.0.8, port: 5432}]
    policy: {idle_timeout: 0s}
  - {name: web, port: 80, cluster_ips: [10.96.0.30], policy: {idle_timeout: 5s}}
""")
    found = _idle_timeouts(mesh)
    assert found[ECHO] == timedelta(seconds=30)
    assert found["outbound|5432||db.default.svc.cluster.local"] == timedelta(0)  # headless
    assert found["outbound|7001||other.default.svc.cluster.local"] == timedelta(hours=1)
    assert found["passthrough"] == timedelta(hours=1)
    assert "http~80" not in found  # HTTP is not a TCP proxy: idle_timeout leaves it alone


def test_registry_only_tls_to_an_external_service_closes_idle_alike() -> None:
    mesh = _mesh("{}", top="outbound_traffic_policy: REGISTRY_ONLY\n", extra="""  - name: secure
    port: 443
    protocol: tls
    external_name: secure.example.com
    policy: {idle_timeout: 90s}
""")
    found = _idle_timeouts(mesh)
    assert found["outbound|443||secure.default.svc.cluster.local~sni"] == timedelta(seconds=90)
    assert found["blackhole"] == timedelta(hours=1)


def test_without_the_fields_the_output_is_what_it_was() -> None:
    """Setting either field to its default changes nothing a sidecar is sent."""
    plain = translate(_mesh("{}"), CAPTURED)
    defaults = translate(_mesh("{connect_timeout: 1s, idle_timeout: 1h}"), CAPTURED)
    for type_url in plain:
        assert [m.SerializeToString(deterministic=True) for m in plain[type_url]] == [
            m.SerializeToString(deterministic=True) for m in defaults[type_url]], type_url


def test_a_traffic_policy_in_kubernetes_takes_both_fields() -> None:
    """The CRD (deploy/kubernetes/01-crd.yaml, generated from the Policy model) takes the
    fields as durations and refuses what is not one; bounds it cannot express (at least
    1ms) the model checks when the source reads the TrafficPolicy."""
    crd = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "01-crd.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    validator = jsonschema.Draft4Validator(spec)
    good = {"targetRef": {"kind": "Service", "name": "echo"},
            "connect_timeout": "250ms", "idle_timeout": "0s"}
    assert list(validator.iter_errors(good)) == []
    read = Policy.model_validate({k: v for k, v in good.items() if k != "targetRef"})
    assert read.idle_timeout == timedelta(0)  # as the source reads the spec
    for bad in ({"idle_timeout": "-1s"}, {"connect_timeout": 5}, {"idle_timeout": "soon"}):
        assert list(validator.iter_errors(good | bad)), bad
    with pytest.raises(ValidationError, match="connect_timeout"):
        Policy.model_validate({"connect_timeout": "0s"})
