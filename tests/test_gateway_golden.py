"""Golden files for ingress gateways: each ``golden/gateway/in/<case>.yaml`` (a mesh
file with gateways and routes, plus a ``proxy:`` block naming the gateway proxy) must
give exactly ``out/<case>.yaml``: the Gateway's status (its conditions, each listener's
conditions and attachedRoutes), the status of every route with a Gateway parent, and the
gateway proxy's listeners and route tables. Regenerate with ``pytest
tests/test_gateway_golden.py --update-golden`` and review the diff like code. A real
Envoy takes these resources in ``tests/test_gateway_e2e.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2

from controlplane import resource
from controlplane.mesh import Mesh
from controlplane.mesh.gateway_attach import gateway_attachments
from controlplane.mesh.route_status import Condition
from controlplane.proxy import ProxyIdentity
from controlplane.translator import Resources, translate
from controlplane.translator.gateway.translate import gateway_resources
from tests.support.gateway_certs import TestCA
from tests.support.golden import Goldens, assert_envoy_accepts, to_dict

GOLDENS = Goldens(Path(__file__).parent / "golden" / "gateway")
CASES = GOLDENS.cases
load_case = GOLDENS.load


def conditions(found: tuple[Condition, ...]) -> list[dict[str, Any]]:
    return [{"type": c.type, "status": c.status, "reason": c.reason, "message": c.message}
            for c in found]


def render(mesh: Mesh, proxy: ProxyIdentity) -> str:
    attachments = gateway_attachments(mesh)
    view = attachments.gateway(proxy.namespace, proxy.gateway)
    assert view is not None
    gateway = {
        "conditions": conditions(view.status.conditions),
        "listeners": [{"name": s.name, "supportedKinds": list(s.supported_kinds),
                       "attachedRoutes": s.attached_routes,
                       "conditions": conditions(s.conditions)}
                      for s in view.status.listeners],
    }
    routes = {"/".join(key): [{"parentRef": p.parent.model_dump(exclude_none=True),
                               "conditions": conditions(p.conditions)} for p in parents]
              for key, parents in sorted(attachments.routes.items())}
    made = gateway_resources(mesh, proxy)
    document = {
        "gateway": gateway,
        "routes": routes,
        "listeners": [to_dict(m) for m in made[resource.LISTENER]],
        "route_tables": [to_dict(m) for m in made[resource.ROUTE]],
    }
    return yaml.safe_dump(document, sort_keys=False, width=100)


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, request: pytest.FixtureRequest) -> None:
    GOLDENS.check(case, render(*load_case(case)), request)


def test_no_stale_golden_files(request: pytest.FixtureRequest) -> None:
    GOLDENS.check_no_stale(request)


def envoy_resources(mesh: Mesh, proxy: ProxyIdentity, cert: str, key: str) -> Resources:
    """The gateway's listeners and route tables, the clusters of every service (as the
    gateway gets them), and each SDS certificate replaced by the test one inline (a
    static config has no ADS to fetch it from)."""
    every = translate(mesh, ProxyIdentity(node_id="probe", service="probe"))
    own = gateway_resources(mesh, proxy)
    listeners = []
    for listener in own[resource.LISTENER]:
        for chain in listener.filter_chains:
            if not chain.transport_socket.typed_config.value:
                continue
            context = tls_pb2.DownstreamTlsContext()
            chain.transport_socket.typed_config.Unpack(context)
            common = context.common_tls_context
            del common.tls_certificate_sds_secret_configs[:]
            common.tls_certificates.append(common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(inline_string=cert),
                private_key=base_pb2.DataSource(inline_string=key)))
            chain.transport_socket.typed_config.Pack(context)
        listeners.append(listener)
    tables = list(own[resource.ROUTE])
    for table in tables:  # RDS does not check clusters; inlined, it would by default
        table.validate_clusters.value = False
    return {resource.CLUSTER: every[resource.CLUSTER],
            resource.ENDPOINT: every[resource.ENDPOINT],
            resource.LISTENER: listeners, resource.ROUTE: tables, resource.SECRET: []}


def test_every_case_is_accepted_by_a_real_envoy(tmp_path: Path) -> None:
    files = TestCA(tmp_path).server("gateway", "shop.example.com")
    cert, key = files.cert.read_text(), files.key.read_text()
    for case in CASES:  # one Envoy each: a gateway has several listeners of its own
        assert_envoy_accepts({case: envoy_resources(*load_case(case), cert, key)})
