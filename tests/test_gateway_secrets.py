"""Gateway certificates at the edge and per stream: ``FileCertificates`` reads and checks
the files a mesh's ``certificates`` name; ``GatewaySecrets`` answers a gateway's streams
the certificates its own listeners name, and nobody else anything. The group snapshot
(what the snapshot store and /debug see) never holds one; the secret's shown form has
its key redacted while its wire bytes are the real ones."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import structlog
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane import resource
from controlplane.assembly import MeshBuild
from controlplane.cache.cache import SnapshotCache
from controlplane.cache.certificates import FileCertificates, NoCertificates, mesh_files
from controlplane.cache.gateway_secrets import GatewaySecrets, certificate_names
from controlplane.mesh import Mesh, load_mesh_data
from controlplane.mesh.gateways import gateway_identity
from controlplane.proxy import GATEWAY, ProxyIdentity
from tests.support.gateway_certs import TestCA

GATEWAY_PROXY = ProxyIdentity(node_id="ingress-1", service="ingress", kind=GATEWAY,
                              gateway="ingress")
OTHER_GATEWAY = ProxyIdentity(node_id="edge-1", service="edge", kind=GATEWAY,
                              gateway="edge")
SIDECAR = ProxyIdentity(node_id="web-1", service="web")


def make_mesh(tmp: Path, ca: TestCA) -> Mesh:
    shop = ca.server("shop", "shop.example.com")
    api = ca.server("api", "api.example.org")
    return load_mesh_data({
        "services": [{"name": "web", "port": 9080,
                      "endpoints": [{"address": "10.0.0.1", "port": 8080}]}],
        "gateways": [
            {"name": "ingress", "listeners": [
                {"name": "https", "port": 443, "protocol": "HTTPS",
                 "tls": {"certificateRefs": [{"name": "shop-cert"}]}}]},
            {"name": "edge", "listeners": [
                {"name": "https", "port": 443, "protocol": "HTTPS",
                 "tls": {"certificateRefs": [{"name": "api-cert"}]}}]},
        ],
        "http_routes": [{"name": "web", "parentRefs": [{"name": "ingress"}, {"name": "edge"}],
                         "rules": [{"backendRefs": [{"name": "web", "port": 9080}]}]}],
        "certificates": [
            {"name": "shop-cert", "cert_file": str(shop.cert), "key_file": str(shop.key)},
            {"name": "api-cert", "cert_file": str(api.cert), "key_file": str(api.key)},
        ],
    })


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


def publish(cache: SnapshotCache, mesh: Mesh, *proxies: ProxyIdentity) -> None:
    build = MeshBuild(mesh)
    for proxy in proxies:
        cache.set_snapshot(proxy.group, build.snapshot(proxy))


def test_file_certificates_read_check_and_hide_the_key(tmp_path: Path, ca: TestCA) -> None:
    mesh = make_mesh(tmp_path, ca)
    files = FileCertificates(lambda: mesh_files(mesh))
    pair = files.pair("default", "shop-cert")
    assert pair is not None
    assert pair.chain_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY" in pair.key_pem
    assert "PRIVATE" not in repr(pair) and "key_pem" not in repr(pair)
    assert files.pair("default", "nope") is None
    assert files.pair("other", "shop-cert") is None

    # A key that is not the certificate's: refused, said without the key.
    wrong = ca.server("wrong", "shop.example.com")
    (tmp_path / "shop.key").write_bytes(wrong.key.read_bytes())
    with structlog.testing.capture_logs() as logs:
        assert files.pair("default", "shop-cert") is None
    [line] = [e for e in logs if e["event"] == "certificates.invalid"]
    assert "not the certificate's" in line["error"]
    assert "PRIVATE" not in repr(logs)

    # Unreadable: refused, the path named.
    (tmp_path / "api.crt").unlink()
    with structlog.testing.capture_logs() as logs:
        assert files.pair("default", "api-cert") is None
    assert any(e["event"] == "certificates.unreadable" and "api.crt" in e["error"]
               for e in logs)


def test_poll_tells_subscribers_when_a_file_changes(tmp_path: Path, ca: TestCA) -> None:
    mesh = make_mesh(tmp_path, ca)
    files = FileCertificates(lambda: mesh_files(mesh))
    told: list[int] = []
    files.subscribe(lambda: told.append(1))
    assert files.poll()  # the first look sees every entry
    assert not files.poll()  # nothing changed since
    renewed = ca.server("renewed", "shop.example.com")
    (tmp_path / "shop.crt").write_bytes(renewed.cert.read_bytes())
    (tmp_path / "shop.key").write_bytes(renewed.key.read_bytes())
    assert files.poll()
    assert len(told) == 2
    pair = files.pair("default", "shop-cert")
    assert pair is not None and pair.chain_pem == renewed.cert.read_bytes()


def test_only_the_gateway_whose_listener_names_it_gets_a_certificate(
        tmp_path: Path, ca: TestCA) -> None:
    mesh = make_mesh(tmp_path, ca)
    cache = SnapshotCache()
    watcher = GatewaySecrets(cache, cache, FileCertificates(lambda: mesh_files(mesh)))
    for proxy in (GATEWAY_PROXY, OTHER_GATEWAY, SIDECAR):
        watcher.connect(proxy)
    publish(cache, mesh, GATEWAY_PROXY, OTHER_GATEWAY, SIDECAR)

    group = cache.current(GATEWAY_PROXY)
    assert group is not None
    assert certificate_names(group) == {"certificate/default/shop-cert"}
    assert not group.types[resource.SECRET].resources  # the group's own: no secret

    mine = watcher.current(GATEWAY_PROXY)
    assert mine is not None and mine.version != group.version
    [secret] = mine.types[resource.SECRET].resources.values()
    assert secret.name == "certificate/default/shop-cert"
    shown = secret.message
    assert isinstance(shown, secret_pb2.Secret)
    assert shown.tls_certificate.private_key.inline_string == "[redacted]"
    wire = discovery_pb2.DiscoveryResponse()
    wire.ParseFromString(secret.sotw_chunk)
    sent = secret_pb2.Secret()
    wire.resources[0].Unpack(sent)
    assert sent.tls_certificate.private_key.inline_bytes == (tmp_path / "shop.key").read_bytes()

    theirs = watcher.current(OTHER_GATEWAY)
    assert theirs is not None
    assert set(theirs.types[resource.SECRET].resources) == {"certificate/default/api-cert"}
    sidecar = watcher.current(SIDECAR)
    assert sidecar is cache.current(SIDECAR)  # passed through untouched
    assert sidecar is not None and not sidecar.types[resource.SECRET].resources


async def test_a_renewal_wakes_the_gateway_stream(tmp_path: Path, ca: TestCA) -> None:
    mesh = make_mesh(tmp_path, ca)
    cache = SnapshotCache()
    files = FileCertificates(lambda: mesh_files(mesh))
    watcher = GatewaySecrets(cache, cache, files)
    watcher.connect(GATEWAY_PROXY)
    publish(cache, mesh, GATEWAY_PROXY)
    first = await watcher.next_snapshot(GATEWAY_PROXY, None)
    waiting = asyncio.ensure_future(watcher.next_snapshot(GATEWAY_PROXY, first))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    renewed = ca.server("renewed", "shop.example.com")
    (tmp_path / "shop.crt").write_bytes(renewed.cert.read_bytes())
    (tmp_path / "shop.key").write_bytes(renewed.key.read_bytes())
    files.poll()
    second = await asyncio.wait_for(waiting, 5)
    assert second.version != first.version
    [secret] = second.types[resource.SECRET].resources.values()
    assert isinstance(secret.message, secret_pb2.Secret)
    assert secret.message.tls_certificate.certificate_chain.inline_bytes == \
        renewed.cert.read_bytes()
    watcher.disconnect(GATEWAY_PROXY)


def test_without_a_provider_the_gateway_waits(tmp_path: Path, ca: TestCA) -> None:
    mesh = make_mesh(tmp_path, ca)
    cache = SnapshotCache()
    watcher = GatewaySecrets(cache, cache, NoCertificates())
    publish(cache, mesh, GATEWAY_PROXY)
    with structlog.testing.capture_logs() as logs:
        found = watcher.current(GATEWAY_PROXY)
    assert found is cache.current(GATEWAY_PROXY)
    assert any(e["event"] == "gateway_secrets.missing" for e in logs)


def test_with_verified_identities_only_the_gateways_own_account_gets_its_keys(
        tmp_path: Path, ca: TestCA) -> None:
    """A node's ``gateway`` metadata is only a claim: once the server verifies who a
    proxy is (a CA, tokens), a Gateway's certificates go only to proxies running as its
    ServiceAccount ``<gateway>-<class>`` in its namespace."""
    mesh = make_mesh(tmp_path, ca)
    cache = SnapshotCache()
    watcher = GatewaySecrets(cache, cache, FileCertificates(lambda: mesh_files(mesh)),
                             lambda ns, name: gateway_identity(mesh.gateways, ns, name))
    owner = dataclasses.replace(
        GATEWAY_PROXY, workload="spiffe://cluster.local/ns/default/sa/ingress-controlplane")
    impostor = dataclasses.replace(
        GATEWAY_PROXY, node_id="web-2", workload="spiffe://cluster.local/ns/default/sa/web")
    elsewhere = dataclasses.replace(  # the right account's name, in another namespace
        GATEWAY_PROXY, node_id="x-1",
        workload="spiffe://cluster.local/ns/other/sa/ingress-controlplane")
    for proxy in (owner, impostor, elsewhere):
        watcher.connect(proxy)
    publish(cache, mesh, owner)

    with structlog.testing.capture_logs() as logs:
        refused = [watcher.current(impostor), watcher.current(elsewhere)]
    for snapshot in refused:
        assert snapshot is not None and not snapshot.types[resource.SECRET].resources
    assert [line["expected"] for line in logs
            if line["event"] == "gateway_secrets.refused"] == ["ingress-controlplane"] * 2
    mine = watcher.current(owner)
    assert mine is not None
    assert set(mine.types[resource.SECRET].resources) == {"certificate/default/shop-cert"}
