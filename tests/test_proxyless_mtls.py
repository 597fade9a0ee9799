"""Proxyless mTLS without processes: what the server sends a gRPC client with and
without certificates (the golden case is ``tests/golden/proxyless/in/mtls.yaml``), the
bootstrap's certificate provider, the plan ``controlplane certs`` reads from it, and
how it publishes files. The end to end proof is ``test_proxyless_mtls_e2e.py``."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import json_format

from controlplane import resource
from controlplane.assembly import MeshBuild
from controlplane.bootstrap_grpc import GrpcBootstrapOptions, build_grpc_bootstrap
from controlplane.mesh import Mesh, load_mesh_data
from controlplane.mesh.security import MeshIdentity
from controlplane.proxy import GRPC, SIDECAR, ProxyIdentity
from controlplane.security import grpc_certs
from controlplane.security.certs_files import DATA, publish
from controlplane.security.certs_plan import PlanError, plan_of
from controlplane.translator.proxyless import LeftOut, grpc_cluster
from tests.support.procs import free_port
from tests.support.snapshots import served

RATINGS = "outbound|9080||ratings.default.svc.cluster.local"
CLIENT = ProxyIdentity(node_id="client-1", service="client", kind=GRPC)
WITH_CERTS = dataclasses.replace(CLIENT, certificates=True)


def mesh(mode: str) -> Mesh:
    data: dict[str, Any] = {"security": {"mtls": {"mode": mode}}, "services": [
        {"name": "ratings", "port": 9080, "protocol": "grpc", "service_accounts": ["ratings"],
         "endpoints": [{"address": "10.0.0.7", "port": 15006}]}]}
    made = load_mesh_data(data)
    return made.model_copy(update={"identity": MeshIdentity(trust_domain="cluster.local")})


def cluster(build: MeshBuild, proxy: ProxyIdentity) -> cluster_pb2.Cluster:
    return served(build, proxy, resource.CLUSTER, RATINGS, cluster_pb2.Cluster)


def tls_of(made: cluster_pb2.Cluster) -> tls_pb2.UpstreamTlsContext | None:
    if not made.HasField("transport_socket"):
        return None
    context = tls_pb2.UpstreamTlsContext()
    assert made.transport_socket.typed_config.Unpack(context)
    return context


def test_a_client_with_certificates_calls_strict_with_mtls_and_permissive_in_plaintext(
) -> None:
    strict = tls_of(cluster(MeshBuild(mesh("strict")), WITH_CERTS))
    assert strict is not None
    common = strict.common_tls_context
    assert common.tls_certificate_provider_instance.instance_name == "mesh"
    validation = common.validation_context
    assert validation.ca_certificate_provider_instance.instance_name == "mesh"
    assert [m.exact for m in validation.match_subject_alt_names] == [
        "spiffe://cluster.local/ns/default/sa/ratings"]
    # Nothing gRPC does not read (it NACKs SDS configs, ignores the rest).
    assert not common.tls_certificate_sds_secret_configs
    assert not common.HasField("combined_validation_context")
    assert tls_of(cluster(MeshBuild(mesh("permissive")), WITH_CERTS)) is None
    assert tls_of(cluster(MeshBuild(mesh("strict")), CLIENT)) is None  # no certificates


def test_a_mode_change_reaches_the_client_though_no_sidecar_cluster_changed() -> None:
    """permissive -> strict leaves the sidecars' cluster as it was (both use auto-mTLS),
    so the gRPC layers are kept by the STRICT set too, not only by their source."""
    before = MeshBuild(mesh("permissive"))
    assert tls_of(cluster(before, WITH_CERTS)) is None
    after = MeshBuild(mesh("strict"), previous=before)
    sidecar = dataclasses.replace(CLIENT, kind=SIDECAR)
    assert cluster(after, sidecar) == cluster(before, sidecar)
    assert tls_of(cluster(after, WITH_CERTS)) is not None
    assert tls_of(cluster(after, CLIENT)) is None
    back = MeshBuild(mesh("permissive"), previous=after)
    assert tls_of(cluster(back, WITH_CERTS)) is None


def test_what_is_left_out_says_why() -> None:
    build = MeshBuild(mesh("strict"))
    source = cluster(build, dataclasses.replace(CLIENT, kind=SIDECAR))
    left = LeftOut()
    assert not grpc_cluster(source, left, None).HasField("transport_socket")  # type: ignore[union-attr]
    assert any("STRICT service refuses" in note and "--cert-dir" in note
               for note in left.summary()), left.summary()
    left = LeftOut()
    grpc_cluster(source, left, frozenset())
    assert any("not STRICT" in note for note in left.summary()), left.summary()


def test_the_node_says_it_has_certificates_and_the_group_keeps_it_apart() -> None:
    node = base_pb2.Node(id="c-1", cluster="client")
    node.metadata.fields["kind"].string_value = "grpc"
    node.metadata.fields["certificates"].string_value = "true"
    proxy = ProxyIdentity.from_node(node)
    assert proxy.certificates and proxy.group.endswith("~certs")
    assert proxy.group != dataclasses.replace(proxy, certificates=False).group
    node.metadata.fields["kind"].string_value = "sidecar"  # a sidecar has SDS instead
    assert not ProxyIdentity.from_node(node).certificates


def test_the_bootstrap_names_the_provider_the_clusters_name(tmp_path: Path) -> None:
    made = build_grpc_bootstrap(GrpcBootstrapOptions(node_id="c-1", service="client",
                                                     cert_dir="/var/run/mesh"))
    assert made["node"]["metadata"]["certificates"] == "true"
    assert made["certificate_providers"] == {"mesh": {"plugin_name": "file_watcher",
                                                      "config": {
        "certificate_file": "/var/run/mesh/cert.pem",
        "private_key_file": "/var/run/mesh/key.pem",
        "ca_certificate_file": "/var/run/mesh/ca.pem", "refresh_interval": "60s"}}}
    assert "certificate_providers" not in build_grpc_bootstrap(
        GrpcBootstrapOptions(node_id="c-1", service="client"))
    # The command makes the directory absolute (gRPC reads it from the app's cwd).
    done = subprocess.run([sys.executable, "-m", "controlplane", "bootstrap", "--grpc",
                           "--node-id", "c-1", "--service", "client", "--cert-dir", "certs"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)["certificate_providers"]["mesh"]["config"]
    assert config["private_key_file"] == str(tmp_path / "certs" / "key.pem")
    sidecar = subprocess.run([sys.executable, "-m", "controlplane", "bootstrap",
                              "--node-id", "c-1", "--service", "client", "--cert-dir", "x"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert sidecar.returncode == 2 and "--cert-dir is for --grpc" in sidecar.stderr


def test_the_plan_is_the_bootstrap_s_server_node_token_and_files() -> None:
    data = build_grpc_bootstrap(GrpcBootstrapOptions(
        node_id="c-1", service="client", namespace="shop", xds_address="cp:18000",
        xds_ca_file="/ca.pem", token_file="/token", cert_dir="/certs"))
    plan = plan_of(data)
    assert (plan.server, plan.ca_file, plan.token_file) == ("cp:18000", "/ca.pem", "/token")
    assert plan.node.id == "c-1" and plan.node.cluster == "client"
    assert json_format.MessageToDict(plan.node.metadata)["kind"] == "grpc"
    assert plan.directory == Path("/certs") and plan.key_file.name == grpc_certs.KEY_FILE


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("certificate_providers"), "--cert-dir"),
    (lambda d: d["node"].pop("id"), "node.id"),
    (lambda d: d.update(xds_servers=[]), "xds_servers[0]"),
    (lambda d: d["certificate_providers"]["mesh"]["config"].pop("private_key_file"),
     "private_key_file"),
    (lambda d: d["certificate_providers"]["mesh"]["config"].update(
        ca_certificate_file="/elsewhere/ca.pem"), "one directory"),
])
def test_a_bootstrap_that_cannot_drive_the_agent_says_what_to_fix(change: Any,
                                                                 message: str) -> None:
    data = build_grpc_bootstrap(GrpcBootstrapOptions(node_id="c-1", service="client",
                                                     cert_dir="/certs"))
    change(data)
    with pytest.raises(PlanError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan_of(data)


def test_publish_switches_every_file_at_once_and_keeps_the_key_private(
        tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    for serial in (1, 2, 3):
        publish(directory, {"ca.pem": (b"roots %d" % serial, 0o644),
                            "key.pem": (b"key %d" % serial, 0o600),
                            "cert.pem": (b"cert %d" % serial, 0o644)})
        for name in ("ca.pem", "key.pem", "cert.pem"):
            assert (directory / name).read_bytes().endswith(b" %d" % serial)
            assert os.readlink(directory / name) == f"{DATA}/{name}"
        assert stat.S_IMODE(os.stat(directory / "key.pem").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(directory / "cert.pem").st_mode) == 0o644
        # One set on disk: the previous ones (their keys) are removed after the switch.
        assert len([p for p in directory.iterdir() if p.name.startswith("..certs-")]) == 1
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith("..certs-")) \
        == [DATA, "ca.pem", "cert.pem", "key.pem"]


def test_publish_replaces_plain_files_left_by_another_tool(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_bytes(b"old")
    publish(tmp_path, {"key.pem": (b"new", 0o600)})
    assert (tmp_path / "key.pem").is_symlink()
    assert (tmp_path / "key.pem").read_bytes() == b"new"


def test_the_agent_gives_up_on_a_server_that_never_answers(tmp_path: Path) -> None:
    """Nothing listens: the agent retries with backoff, and exits 1 at --timeout saying
    what to check; no file is written."""
    bootstrap = tmp_path / "bootstrap.json"
    bootstrap.write_text(json.dumps(build_grpc_bootstrap(GrpcBootstrapOptions(
        node_id="c-1", service="client", xds_address=f"127.0.0.1:{free_port()}",
        cert_dir=str(tmp_path / "certs")))))
    done = subprocess.run([sys.executable, "-m", "controlplane", "certs", "--bootstrap",
                           str(bootstrap), "--once", "--timeout", "2"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done
    assert "no certificate from 127.0.0.1:" in done.stderr and "within 2s" in done.stderr
    assert not (tmp_path / "certs").exists()
    missing = subprocess.run([sys.executable, "-m", "controlplane", "certs", "--bootstrap",
                              str(tmp_path / "nope.json")],
                             capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 2 and "cannot read the bootstrap" in missing.stderr
