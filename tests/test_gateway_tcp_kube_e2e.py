"""TCP and TLS-terminated streams through a Gateway from Kubernetes, end to end:
``serve --source kubernetes`` against the API server double makes the Gateway's
Deployment; its Envoy runs in a test pod as the Deployment says
(``test_kube_gateway_e2e.run_pod``); a TLS listener in mode Terminate serves the
certificate of a ``kubernetes.io/tls`` Secret, and a real Python ssl client's decrypted
bytes reach a plaintext TCP server in a backend pod by a TCPRoute; a TCP listener's
TCPRoute reaches it in the clear. The Secret's key is in no server log, no gateway log
and no /debug page; the TCPRoute's status is written.

Follows TLSRouteTerminateSimpleSameNamespace's listener (with a TCPRoute, as a TLS
Terminate listener also takes) and TCPRouteParentRefPortAndSectionName.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
from pathlib import Path

import pytest

from controlplane.sources.kubernetes.deployer import resource_name
from controlplane.sources.kubernetes.kinds import DEPLOYMENTS, GATEWAY_CONTROLLER, TCP_ROUTES
from tests.kube.apiserver import ApiServerDouble
from tests.kube.objects import endpoint_slice, service
from tests.kube.rbac import Rbac, granted_certificates
from tests.support import pods
from tests.support.gateway_certs import TestCA, key_marker
from tests.support.kube_gateways import gateway, gateway_class, tcp_route, tls_secret
from tests.support.procs import wait_for
from tests.test_gateway_tcp_e2e import read_line
from tests.test_kube_gateway_e2e import _get, gateway_server, network, run_pod

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180),
              pytest.mark.skipif(pods.available() is not None,
                                 reason=f"test pods: {pods.available()}")]

__all__ = ["network"]  # the fixture, shared

TCP_ECHO = str(Path(__file__).parent / "support" / "tcp_echo.py")
HOST = "db.example.com"
TLS_PORT, TCP_PORT, DB_PORT = 8443, 5432, 6432


def banner_over_tls(address: str, context: ssl.SSLContext) -> str:
    """The backend's first line, over TLS to the gateway (SNI ``HOST``, verified); ""
    when it failed."""
    try:
        with socket.create_connection((address, TLS_PORT), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname=HOST) as tls:
            tls.sendall(b"hello\n")
            return read_line(tls)
    except (OSError, ssl.SSLError):
        return ""


def banner_over_tcp(address: str) -> str:
    try:
        with socket.create_connection((address, TCP_PORT), timeout=5) as conn:
            return read_line(conn)
    except OSError:
        return ""


def test_a_kubernetes_gateway_terminates_tls_for_a_tcp_backend(network: pods.PodNetwork,
                                                               tmp_path: Path) -> None:
    db = network.pod("db")
    gw = network.pod("gateway")
    db.run([sys.executable, TCP_ECHO, "0.0.0.0", str(DB_PORT), "db"])
    ca = TestCA(tmp_path)
    files = ca.server("db", HOST)
    marker = key_marker(files)
    api = ApiServerDouble(bookmark_interval=0.5,
                          rbac=Rbac(roles=granted_certificates("default"))).start()
    server = gateway_server(api, network, tmp_path)
    try:
        api.create(service("db").port(DB_PORT, name="tcp-postgres").build())
        api.create(endpoint_slice("db-abc", service="db").endpoint(db.address)
                   .port(DB_PORT, name="tcp-postgres").build())
        api.create(gateway_class())
        api.create(gateway("ingress", [
            {"name": "db-tls", "port": TLS_PORT, "protocol": "TLS", "hostname": HOST,
             "tls": {"mode": "Terminate",
                     "certificateRefs": [{"kind": "Secret", "name": "db-cert"}]}},
            {"name": "db-tcp", "port": TCP_PORT, "protocol": "TCP"}]))
        for section in ("db-tls", "db-tcp"):
            api.create(tcp_route(section, {
                "parentRefs": [{"name": "ingress", "sectionName": section}],
                "rules": [{"backendRefs": [{"name": "db", "port": DB_PORT}]}]}))
        api.create(tls_secret("db-cert", files))
        server.start()

        name = resource_name("ingress", "controlplane")
        deployment = wait_for(lambda: _get(api, DEPLOYMENTS, name), timeout=30,
                              what="the Gateway's Deployment")
        gateway_log = run_pod(gw, deployment, f"{name}-7c9d5b8f6-q4w2e")

        # The banner line: "db <original destination> <local> <peer>": the backend got
        # the connection in the clear, from the gateway pod.
        context = ca.client_context()
        line = wait_for(lambda: banner_over_tls(gw.address, context), timeout=30,
                        what="a TLS-terminated connection through the gateway")
        assert line.split()[0] == "db" and line.split()[-1].startswith(f"{gw.address}:")
        assert banner_over_tcp(gw.address).split()[0] == "db"
        relaxed = ca.client_context()
        relaxed.check_hostname = False
        with pytest.raises((OSError, ssl.SSLError)), \
                socket.create_connection((gw.address, TLS_PORT), timeout=5) as raw, \
                relaxed.wrap_socket(raw, server_hostname="other.example.com") as tls:
            tls.sendall(b"x\n")  # no chain for another name: no handshake

        parents = wait_for(lambda: (_get(api, TCP_ROUTES, "db-tls") or {}).get(
            "status", {}).get("parents"), what="the TCPRoute's status")
        (ours,) = [p for p in parents if p["controllerName"] == GATEWAY_CONTROLLER]
        assert {c["type"]: c["status"] for c in ours["conditions"]} == {
            "Accepted": "True", "ResolvedRefs": "True"}

        for path in ("/debug/proxies", f"/debug/config_dump?node={name}-7c9d5b8f6-q4w2e"
                     ".default"):
            assert marker not in json.dumps(server.json(path)), path
        assert marker not in server.log_path.read_text()
        assert marker not in gateway_log.read_text()
    finally:
        server.stop()
        api.stop()
