"""Golden files for the Gateway API translation: each ``golden/gateway_api/in/<case>.yaml``
(a mesh file with routes, plus a ``proxy:`` block) must give exactly
``out/<case>.yaml``: the route status of every route, and the virtual hosts of the
services routes attach to (as the proxy gets them; domains left out, they are the
usual ones). Regenerate with ``pytest tests/test_gateway_api_golden.py --update-golden``
and review the diff like code. Every case's whole translation must also pass a real
``envoy --mode validate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import resource
from controlplane.mesh import Mesh
from controlplane.mesh.attach import attach
from controlplane.proxy import ProxyIdentity
from controlplane.translator import translate
from tests.support.golden import Goldens, assert_envoy_accepts, to_dict

GOLDENS = Goldens(Path(__file__).parent / "golden" / "gateway_api")
CASES = GOLDENS.cases


def render(mesh: Mesh, proxy: ProxyIdentity) -> str:
    statuses = {
        "/".join(key): [{"parentRef": status.parent.model_dump(exclude_none=True),
                         "conditions": [{"type": c.type, "status": c.status,
                                         "reason": c.reason, "message": c.message}
                                        for c in status.conditions]}
                        for status in parents]
        for key, parents in sorted(attach(mesh).statuses().items())}
    routed = attach(mesh).routed
    [table] = translate(mesh, proxy)[resource.ROUTE]
    hosts = []
    for host in table.virtual_hosts:
        if host.name.split(":")[0] not in routed:
            continue
        data = to_dict(host)
        data.pop("domains", None)
        data.pop("request_headers_to_add", None)  # the mesh's source header, as always
        hosts.append(data)
    document: dict[str, Any] = {"status": statuses, "virtual_hosts": hosts}
    if table.HasField("validate_clusters"):
        document["validate_clusters"] = table.validate_clusters.value
    return yaml.safe_dump(document, sort_keys=False, width=100)


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, request: pytest.FixtureRequest) -> None:
    GOLDENS.check(case, render(*GOLDENS.load(case)), request)


def test_every_case_is_accepted_by_a_real_envoy() -> None:
    assert_envoy_accepts({case: translate(*GOLDENS.load(case)) for case in CASES})


def test_no_stale_golden_files(request: pytest.FixtureRequest) -> None:
    GOLDENS.check_no_stale(request)
