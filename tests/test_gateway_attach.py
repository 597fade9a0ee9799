"""Gateway attachment as pure functions (``mesh/gateway_attach.py``) and the gateway's
bootstrap: the hostname intersection table of the Gateway API's HTTPRoute hostname rules
(conformance: HTTPRouteHostnameIntersection, HTTPRouteListenerHostnameMatching), the
reasons a route is not accepted, the conditions a listener reports, and what
``controlplane bootstrap --gateway`` tells the server (the golden files show whole
translations; tests/test_gateway_e2e.py a real Envoy)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from controlplane.bootstrap import BootstrapOptions, build_bootstrap
from controlplane.mesh import load_mesh_data
from controlplane.mesh.gateway_attach import gateway_attachments, intersect
from controlplane.proxy import GATEWAY, ProxyIdentity


@pytest.mark.parametrize(("listener", "route", "served"), [
    (None, [], ("*",)),
    (None, ["a.example.com"], ("a.example.com",)),
    ("a.example.com", [], ("a.example.com",)),
    ("a.example.com", ["a.example.com", "b.example.com"], ("a.example.com",)),
    ("*.example.com", ["a.example.com", "x.y.example.com", "example.com"],
     ("a.example.com", "x.y.example.com")),
    ("*.example.com", ["*.example.com"], ("*.example.com",)),
    ("*.example.com", ["*.sub.example.com"], ("*.sub.example.com",)),
    ("a.example.com", ["*.example.com"], ("a.example.com",)),
    ("*.sub.example.com", ["*.example.com"], ("*.sub.example.com",)),
    ("a.example.com", ["*.other.com", "b.example.com"], ()),
    ("*.example.com", ["example.com"], ()),
])
def test_hostname_intersection(listener: str | None, route: list[str],
                               served: tuple[str, ...]) -> None:
    assert intersect(listener, route) == served


def gateway_mesh(**extra: Any) -> Any:
    return load_mesh_data({
        "services": [{"name": "web", "port": 9080,
                      "endpoints": [{"address": "10.0.0.1", "port": 8080}]}],
        "gateways": [{"name": "ingress", "listeners": [
            {"name": "http", "port": 80, "protocol": "HTTP", "hostname": "*.example.com"},
            {"name": "https", "port": 443, "protocol": "HTTPS",
             "tls": {"certificateRefs": [{"name": "cert"}]}},
        ]}],
        **extra,
    })


def route(name: str, parent: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"name": name, "parentRefs": [parent],
            "rules": [{"backendRefs": [{"name": "web", "port": 9080}]}], **fields}


def test_route_reasons_per_gateway_parent() -> None:
    mesh = gateway_mesh(http_routes=[
        route("ok", {"name": "ingress", "sectionName": "http"}, hostnames=["a.example.com"]),
        route("host", {"name": "ingress", "sectionName": "http"}, hostnames=["a.other.com"]),
        route("ns", {"name": "ingress", "namespace": "default"}, namespace="shop"),
        route("section", {"name": "ingress", "sectionName": "nope"}),
        route("gone", {"name": "missing"}),
    ])
    statuses = gateway_attachments(mesh).routes

    def reason(namespace: str, name: str) -> str:
        [parent] = statuses[("HTTPRoute", namespace, name)]
        found = parent.condition("Accepted")
        assert found is not None
        return found.reason

    assert reason("default", "ok") == "Accepted"
    assert reason("default", "host") == "NoMatchingListenerHostname"
    assert reason("shop", "ns") == "NotAllowedByListeners"
    assert reason("default", "section") == "NoMatchingParent"
    assert reason("default", "gone") == "NoMatchingParent"


def test_a_missing_certificate_keeps_only_its_listener_out() -> None:
    """GatewayInvalidTLSConfiguration: ResolvedRefs False InvalidCertificateRef and not
    Programmed, the Gateway still Programmed by its other listener."""
    view = gateway_attachments(gateway_mesh()).gateway("default", "ingress")
    assert view is not None
    https = next(s for s in view.status.listeners if s.name == "https")
    refs = next(c for c in https.conditions if c.type == "ResolvedRefs")
    assert (refs.status, refs.reason) == (False, "InvalidCertificateRef")
    assert "default/cert" in refs.message and "certificates entry" in refs.message
    assert [s.listener.name for s in view.served] == ["http"]
    programmed = next(c for c in view.status.conditions if c.type == "Programmed")
    assert programmed.status and "1 of 2" in programmed.message

    with_cert = gateway_mesh(certificates=[{"name": "cert", "cert_file": "/c",
                                            "key_file": "/k"}])
    view = gateway_attachments(with_cert).gateway("default", "ingress")
    assert view is not None and [s.listener.name for s in view.served] == ["http", "https"]


def test_bootstrap_gateway_says_kind_and_name() -> None:
    boot = build_bootstrap(BootstrapOptions(node_id="ingress-1", service="ingress",
                                            namespace="shop", gateway="ingress",
                                            inbound_address="127.0.0.1"))
    assert boot["node"]["cluster"] == "ingress"
    assert boot["node"]["metadata"] == {"namespace": "shop", "egress_port": 15001,
                                        "kind": "gateway", "gateway": "ingress",
                                        "inbound_address": "127.0.0.1"}
    node = json_format.ParseDict(boot["node"], base_pb2.Node())
    proxy = ProxyIdentity.from_node(node)
    assert (proxy.kind, proxy.gateway, proxy.namespace) == (GATEWAY, "ingress", "shop")
    assert proxy.inbound_address == "127.0.0.1" and "~address=127.0.0.1" in proxy.group


def test_bootstrap_command_takes_gateway_in_place_of_service() -> None:
    done = subprocess.run([sys.executable, "-m", "controlplane", "bootstrap", "--node-id",
                           "gw-1", "--gateway", "ingress"], capture_output=True, text=True,
                          timeout=60, check=True)
    boot = yaml.safe_load(done.stdout)
    assert boot["node"]["cluster"] == "ingress"
    assert boot["node"]["metadata"]["kind"] == "gateway"
    refused = subprocess.run([sys.executable, "-m", "controlplane", "bootstrap", "--node-id",
                              "gw-1", "--gateway", "ingress", "--inbound-port", "1",
                              "--app-port", "2"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "--gateway does not go with" in refused.stderr
    missing = subprocess.run([sys.executable, "-m", "controlplane", "bootstrap", "--node-id",
                              "gw-1"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "--service is required" in missing.stderr
