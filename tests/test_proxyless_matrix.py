"""No NACK from a gRPC client for any mesh our validation accepts: every translator
golden input (every policy feature, scoping, DNS and external services, capture and
telemetry settings), the Gateway API route goldens and the proxyless ones are served in
turn by one real ``controlplane serve`` (the mesh file rewritten: hot reload), and a real
grpcio client process resolves one name of every virtual host its table has, fetching
every listener, route table, cluster and load assignment it would use. While it holds
its channels, each of its xDS streams must have ACKed every type, and none NACKed.

(Cases with mesh identity are left out: they need ``serve --ca-dir``; their translation
is in the proxyless golden ``security``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.assembly import MeshBuild
from controlplane.mesh import load_mesh_data
from controlplane.mesh.loader import parse_mesh_yaml
from controlplane.proxy import GRPC, ProxyIdentity
from controlplane.translator.proxyless import GRPC_ROUTE
from tests.support.procs import ControlPlane, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

TESTS = Path(__file__).parent
SOURCES = [TESTS / "testdata" / "translator" / "in", TESTS / "golden" / "gateway_api" / "in",
           TESTS / "golden" / "proxyless" / "in"]
MAX_TARGETS = 40  # names dialled per case (one per virtual host), bounded

# Resolves each target (connectivity asked for, no call made), says so, then holds its
# channels (and xDS streams) until its stdin closes.
CLIENT = r'''
import json, sys
import grpc
channels = [grpc.insecure_channel(t) for t in json.loads(sys.argv[1])]
for channel in channels:
    channel._channel.check_connectivity_state(True)
print("resolving", flush=True)
sys.stdin.read()
'''


def cases() -> list[Path]:
    found = []
    for folder in SOURCES:
        for path in sorted(folder.glob("*.yaml")):
            if "server_identity" not in parse_mesh_yaml(path.read_text(encoding="utf-8")):
                found.append(path)
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    tmp = tmp_path_factory.mktemp("proxyless-matrix")
    mesh = tmp / "mesh.yaml"
    mesh.write_text("services: []\n")
    made = ControlPlane(mesh, tmp).start()
    try:
        yield made
    finally:
        made.stop()


@pytest.mark.parametrize("case", cases(), ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_a_grpc_client_acks_every_resource(case: Path, server: ControlPlane,
                                           tmp_path: Path) -> None:
    data = parse_mesh_yaml(case.read_text(encoding="utf-8"))
    proxy_fields = data.pop("proxy")
    proxy = ProxyIdentity(**{k: v for k, v in proxy_fields.items()
                             if k in ("node_id", "service", "namespace", "zone")}, kind=GRPC)
    targets = _targets(data, proxy)
    if not targets:
        pytest.skip("no virtual host for a gRPC client")
    _serve(server, data, tmp_path)
    node_id = f"matrix-{case.parent.parent.name}-{case.stem}"
    bootstrap = tmp_path / "bootstrap.json"
    made = subprocess.run(
        [sys.executable, "-m", "controlplane", "bootstrap", "--grpc", "--node-id", node_id,
         "--service", proxy.service, "--namespace", proxy.namespace,
         *(["--zone", proxy.zone] if proxy.zone else []),
         "--xds-address", f"127.0.0.1:{server.xds_port}", "-o", str(bootstrap)],
        capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    with subprocess.Popen([sys.executable, "-c", CLIENT, json.dumps(targets)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap)}) as client:
        try:
            assert client.stdout is not None
            assert client.stdout.readline() == "resolving\n"
            streams = wait_for(lambda: _settled(server, node_id, len(targets)), timeout=60,
                               what=f"{len(targets)} streams of {node_id} ACKed or NACKed")
            nacks = {(s["stream_id"], kind): state["last_nack"]["error"]
                     for s in streams for kind, state in s["types"].items()
                     if state["last_nack"] is not None}
            assert not nacks, nacks
        finally:
            try:
                client.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                client.kill()
                client.communicate(timeout=10)


def _targets(data: dict[str, Any], proxy: ProxyIdentity) -> list[str]:
    """``xds:///`` plus the first domain of each virtual host of the client's table."""
    mesh = load_mesh_data({k: v for k, v in data.items() if k != "server_identity"},
                          origin="matrix")
    snapshot = MeshBuild(mesh).snapshot(proxy)
    routes = snapshot.get("type.googleapis.com/envoy.config.route.v3.RouteConfiguration")
    assert routes is not None
    config = routes.resources[GRPC_ROUTE].message
    return [f"xds:///{host.domains[0]}" for host in config.virtual_hosts][:MAX_TARGETS]


def _serve(server: ControlPlane, data: dict[str, Any], tmp: Path) -> None:
    """Write the mesh (atomically) and wait for the server to accept it."""
    before = _accepted(server)
    staged = tmp / "mesh.tmp"
    staged.write_text(yaml.safe_dump(data))
    staged.replace(Path(server.source.removeprefix("file:")))
    wait_for(lambda: _accepted(server) > before, timeout=30, what="the mesh accepted")


def _accepted(server: ControlPlane) -> int:
    return sum(1 for line in server.logs() if line.get("event") == "mesh.accepted")


def _settled(server: ControlPlane, node_id: str, count: int) -> list[dict[str, Any]] | None:
    """The node's streams once there are ``count`` and each has an answer (ACK or NACK)
    for every type it was sent, listeners and routes at least."""
    streams = [p for p in server.json("/debug/proxies") if p["node_id"] == node_id]
    if len(streams) != count:
        return None
    for stream in streams:
        types = stream["types"]
        if not {"lds", "rds"} <= set(types):
            return None
        for state in types.values():
            answered = state["acked_version"] == state["sent_version"] or (
                state["last_nack"] is not None)
            if not state["sent_version"] or not answered:
                return None
    return streams
