"""Sidecars calling proxyless gRPC servers (endpoints marked ``proxyless``): the model,
the translation for sidecars and gRPC clients as the mode changes, and the Kubernetes
path from injection to the endpoint. The golden case is
tests/testdata/translator/in/security_proxyless_server.yaml; the real processes are in
tests/test_proxyless_sidecar_e2e.py."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from controlplane import resource
from controlplane.assembly import MeshBuild
from controlplane.errors import MeshError
from controlplane.inject.config import InjectConfig
from controlplane.inject.pod import inject_pod
from controlplane.mesh import Mesh, load_mesh_data
from controlplane.mesh.security import MeshIdentity, security_warnings
from controlplane.proxy import ProxyIdentity
from controlplane.sources.kubernetes.convert import Converter, convert
from controlplane.sources.kubernetes.kinds import PROXYLESS_LABEL
from controlplane.sources.kubernetes.status import conditions
from controlplane.sources.kubernetes.store import labels_only
from controlplane.translator.clusters import HTTP_PROTOCOL_OPTIONS
from controlplane.translator.security.mtls import MATCH_METADATA
from tests.kube.apiserver import ApiServerDouble
from tests.kube.objects import endpoint_slice, pod, security_policy, service
from tests.support.kube_waits import mesh_where
from tests.support.snapshots import served
from tests.test_kube_source import Feed, source
from tests.test_proxyless_mtls import CLIENT, WITH_CERTS, tls_of
from tests.test_webhook import XDS

ECHO = "outbound|9090||echo.default.svc.cluster.local"
SIDECAR = ProxyIdentity(node_id="web-1", service="web")


def mesh(mode: str, *endpoints: dict[str, Any]) -> Mesh:
    """echo (gRPC) with ``endpoints`` (default: one proxyless server), mode from the mesh."""
    found = list(endpoints) or [{"address": "10.0.0.2", "port": 50051,
                                 "service_account": "echo", "proxyless": True}]
    made = load_mesh_data({"security": {"mtls": {"mode": mode}}, "services": [
        {"name": "echo", "port": 9090, "protocol": "grpc", "endpoints": found}]})
    return made.model_copy(update={"identity": MeshIdentity(trust_domain="cluster.local")})


def cluster(build: MeshBuild, proxy: ProxyIdentity) -> cluster_pb2.Cluster:
    return served(build, proxy, resource.CLUSTER, ECHO, cluster_pb2.Cluster)


def tls_modes(build: MeshBuild) -> list[str]:
    """Each endpoint's ``tlsMode`` as a sidecar gets it ("" for none)."""
    message = served(build, SIDECAR, resource.ENDPOINT, ECHO, endpoint_pb2.ClusterLoadAssignment)
    return [(e.metadata.filter_metadata[MATCH_METADATA].fields["tlsMode"].string_value
             if MATCH_METADATA in e.metadata.filter_metadata else "")
            for group in message.endpoints for e in group.lb_endpoints]


def matches(made: cluster_pb2.Cluster) -> dict[str, list[str]]:
    """The cluster's socket matches: name -> the ALPN its TLS offers."""
    found = {}
    for match in made.transport_socket_matches:
        context = tls_pb2.UpstreamTlsContext()
        assert match.transport_socket.typed_config.Unpack(context)
        found[match.name] = list(context.common_tls_context.alpn_protocols)
    return found


# --- translation ----------------------------------------------------------------------------


def test_a_mode_change_moves_a_proxyless_endpoint_between_mtls_and_plaintext() -> None:
    """Only STRICT gets mTLS (offering h2); PERMISSIVE and DISABLE call it in plaintext.
    The change comes from the mesh-wide mode, and reaches an incremental build."""
    permissive = MeshBuild(mesh("permissive"))
    assert matches(cluster(permissive, SIDECAR)) == {}
    assert tls_modes(permissive) == [""]
    strict = MeshBuild(mesh("strict"), previous=permissive)
    assert matches(cluster(strict, SIDECAR)) == {"mtls-grpc": ["controlplane-mtls", "h2"]}
    assert tls_modes(strict) == ["mtls-grpc"]
    assert HTTP_PROTOCOL_OPTIONS in cluster(strict, SIDECAR).typed_extension_protocol_options
    disable = MeshBuild(mesh("disable"), previous=strict)
    assert matches(cluster(disable, SIDECAR)) == {}
    assert tls_modes(disable) == [""]


def test_sidecar_endpoints_beside_a_proxyless_one_keep_their_match() -> None:
    sidecar = {"address": "10.0.0.1", "port": 15006, "service_account": "echo"}
    proxyless = {"address": "10.0.0.2", "port": 50051, "service_account": "echo",
                 "proxyless": True}
    strict = MeshBuild(mesh("strict", sidecar, proxyless))
    assert matches(cluster(strict, SIDECAR)) == {
        "mtls": ["controlplane-mtls"], "mtls-grpc": ["controlplane-mtls", "h2"]}
    assert tls_modes(strict) == ["mtls", "mtls-grpc"]
    permissive = MeshBuild(mesh("permissive", sidecar, proxyless))
    assert matches(cluster(permissive, SIDECAR)) == {"mtls": ["controlplane-mtls"]}
    assert tls_modes(permissive) == ["mtls", ""]


def test_a_grpc_client_calls_a_strict_proxyless_server_with_mtls() -> None:
    """gRPC clients with certificates read the peer SANs from the proxyless match too;
    PERMISSIVE stays plaintext, and says nothing (nothing is left out)."""
    strict = tls_of(cluster(MeshBuild(mesh("strict")), WITH_CERTS))
    assert strict is not None
    validation = strict.common_tls_context.validation_context
    assert [m.exact for m in validation.match_subject_alt_names] == [
        "spiffe://cluster.local/ns/default/sa/echo"]
    assert tls_of(cluster(MeshBuild(mesh("permissive")), WITH_CERTS)) is None
    assert tls_of(cluster(MeshBuild(mesh("strict")), CLIENT)) is None  # no certificates
    sidecar_cluster = cluster(MeshBuild(mesh("permissive")), dataclasses.replace(
        WITH_CERTS, kind="sidecar", certificates=False))
    assert not sidecar_cluster.transport_socket_matches


# --- the model ------------------------------------------------------------------------------


def test_proxyless_must_be_a_boolean_named_by_field() -> None:
    with pytest.raises(MeshError) as info:
        load_mesh_data({"services": [{"name": "echo", "port": 9090, "protocol": "grpc",
                                      "endpoints": [{"address": "10.0.0.2", "port": 1,
                                                     "proxyless": "sometimes"}]}]})
    [problem] = info.value.problems
    assert problem == ("services[0] (echo.default).endpoints[0].proxyless: 'sometimes' is "
                       "not a boolean; write true for a proxyless gRPC server "
                       "(grpc.server(xds=True)), else false"), problem


def test_strict_with_proxyless_servers_only_is_not_said_to_refuse_its_callers() -> None:
    assert security_warnings(mesh("strict")) == []
    anonymous = mesh("strict", {"address": "10.0.0.2", "port": 50051, "proxyless": True})
    [warning] = security_warnings(anonymous)
    assert warning.startswith("services[0] (echo.default): a proxyless endpoint names no "
                              "service_account"), warning
    assert "give each endpoint's service_account" in warning
    plaintext = mesh("strict", {"address": "10.0.0.2", "port": 50051})
    assert "no endpoint has a sidecar" in security_warnings(plaintext)[0]


# --- Kubernetes -----------------------------------------------------------------------------


def grpc_pod(name: str, account: str) -> dict[str, Any]:
    """A pod as proxyless injection leaves it (the webhook's code)."""
    raw = pod(name).service_account(account).annotation(
        "mesh.controlplane.io/proxyless", "grpc").build()
    raw["spec"]["containers"] = [{"name": "app", "image": "app:1"}]
    made = inject_pod(raw, "default", InjectConfig(xds_address=XDS).check())
    assert "--grpc-server" in made["spec"]["initContainers"][0]["args"]
    return made


def injected_grpc_pod(name: str, account: str) -> dict[str, Any]:
    """:func:`grpc_pod` as the source's pod store keeps it."""
    return labels_only(grpc_pod(name, account))


def services(name: str) -> list[dict[str, Any]]:
    return [service(name).port(9090, name="grpc").build()]


def echo_slices() -> list[dict[str, Any]]:
    builder = endpoint_slice("echo-a", service="echo")
    builder.endpoint("10.0.0.1", pod="echo-sidecar")
    builder.endpoint("10.0.0.2", pod="echo-grpc")
    return [builder.port(50051, name="grpc").build()]


def test_a_proxyless_injected_pod_is_a_proxyless_server_endpoint() -> None:
    pods = {("default", "echo-sidecar"): labels_only(pod("echo-sidecar").injected("echo")
                                                      .build()),
            ("default", "echo-grpc"): injected_grpc_pod("echo-grpc", "echo")}
    result = convert(services("echo"), echo_slices(), [], pods)
    [echo] = result.mesh.services
    assert [(e.address, e.service_account, e.proxyless) for e in echo.endpoints] == [
        ("10.0.0.1", "echo", False), ("10.0.0.2", "echo", True)]
    assert result.skipped == []


def test_the_proxyless_label_alone_converts_the_service_again() -> None:
    converter, objs = Converter(), services("echo")
    pods = {("default", "echo-grpc"): labels_only(pod("echo-grpc").injected("echo").build())}
    first = converter.convert(objs, echo_slices(), [], pods).mesh
    assert not first.services[0].endpoints[1].proxyless
    pods[("default", "echo-grpc")] = injected_grpc_pod("echo-grpc", "echo")
    second = converter.convert(objs, echo_slices(), [], pods).mesh
    assert second.services[0].endpoints[1].proxyless


def test_strict_on_proxyless_servers_only_is_resolved() -> None:
    """The NoSidecars condition (strict with nothing to take mTLS) is not said of a
    Service whose pods are proxyless servers: they take mTLS under STRICT."""
    slices = [endpoint_slice("echo-a", service="echo").endpoint("10.0.0.2", pod="echo-grpc")
              .port(50051, name="grpc").build()]
    pods = {("default", "echo-grpc"): injected_grpc_pod("echo-grpc", "echo")}
    policy = security_policy("echo", target="echo").mtls("strict").build()
    verdict = convert(services("echo"), slices, [], pods,
                      security_policies=[policy]).security_verdicts[("default", "echo")]
    assert verdict.accepted and verdict.unresolved == ""
    assert [c["status"] for c in conditions(verdict, None)] == ["True", "True"]


def test_a_proxyless_server_on_an_http_port_is_said() -> None:
    """Callers speak HTTP/1.1 on an http port; a gRPC server needs HTTP/2."""
    made = load_mesh_data({"services": [{"name": "echo", "ports": [
        {"name": "web", "port": 8080}, {"name": "grpc", "port": 9090, "protocol": "grpc"}],
        "endpoints": [{"address": "10.0.0.2", "ports": {"web": 8080, "grpc": 50051},
                       "proxyless": True}]}]})
    assert security_warnings(made) == [
        "services[0] (echo.default): port 8080 (http) is served by proxyless gRPC "
        "endpoints, which speak only gRPC over HTTP/2: callers speak HTTP/1.1 to them "
        "there; give the port protocol: grpc"]


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    double = ApiServerDouble(bookmark_interval=0.5).start()
    yield double
    double.stop()


async def test_an_injected_pod_through_the_api_is_a_proxyless_endpoint(
        api: ApiServerDouble, tmp_path: Path) -> None:
    """The Pod as the webhook left it, stored by the API server double and watched as
    metadata: its endpoint is proxyless with its ServiceAccount; removing the label
    (a Pod no longer injected so) makes it plaintext-only again."""
    api.create(services("echo")[0])
    injected = api.create(grpc_pod("echo-grpc", "echo"))
    api.create(echo_slices()[0])
    updates = Feed(source(api, tmp_path).updates())
    mesh = await mesh_where(updates, lambda m: any(
        e.proxyless for s in m.services for e in s.endpoints))
    [echo] = mesh.services
    assert [(e.address, e.service_account, e.proxyless) for e in echo.endpoints] == [
        ("10.0.0.1", None, False), ("10.0.0.2", "echo", True)]
    relabelled = copy.deepcopy(injected)
    del relabelled["metadata"]["labels"][PROXYLESS_LABEL]
    api.apply(relabelled)
    mesh = await mesh_where(updates, lambda m: not any(
        e.proxyless for s in m.services for e in s.endpoints))
    assert mesh.services[0].endpoints[1].service_account == "echo"
    await updates.aclose()
