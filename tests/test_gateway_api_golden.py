"""Golden files for the Gateway API translation: each ``golden/gateway_api/in/<case>.yaml``
(a mesh file with routes, plus a ``proxy:`` block) must give exactly
``out/<case>.yaml``: the route status of every route, and the virtual hosts of the
services routes attach to (as the proxy gets them; domains left out, they are the
usual ones). Regenerate with ``pytest tests/test_gateway_api_golden.py --update-golden``
and review the diff like code. Every case's whole translation must also pass a real
``envoy --mode validate``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import resource
from controlplane.mesh import Mesh, load_mesh_data
from controlplane.mesh.attach import attach
from controlplane.mesh.loader import parse_mesh_yaml
from controlplane.proxy import ProxyIdentity
from controlplane.translator import translate
from tests.support.envoy_validate import rejected
from tests.test_translator_golden import to_dict

DATA = Path(__file__).parent / "golden" / "gateway_api"
IN, OUT = DATA / "in", DATA / "out"
CASES = sorted(path.stem for path in IN.glob("*.yaml"))


def load_case(name: str) -> tuple[Mesh, ProxyIdentity]:
    path = IN / f"{name}.yaml"
    data = parse_mesh_yaml(path.read_text(encoding="utf-8"))
    proxy = ProxyIdentity(**data.pop("proxy"))
    return load_mesh_data(data, origin=str(path)), proxy


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
    actual = render(*load_case(case))
    golden = OUT / f"{case}.yaml"
    if request.config.getoption("--update-golden"):
        OUT.mkdir(parents=True, exist_ok=True)
        golden.write_text(actual, encoding="utf-8")
        return
    assert golden.exists(), f"{golden} is missing; run pytest --update-golden"
    expected = golden.read_text(encoding="utf-8")
    if actual != expected:
        diff = difflib.unified_diff(expected.splitlines(keepends=True),
                                    actual.splitlines(keepends=True),
                                    fromfile=f"out/{case}.yaml (golden)",
                                    tofile=f"out/{case}.yaml (actual)")
        pytest.fail("translation differs from the golden file:\n" + "".join(diff), False)


def test_every_case_is_accepted_by_a_real_envoy() -> None:
    translations = [translate(*load_case(case)) for case in CASES]
    refused = rejected(translations)
    assert not refused, {CASES[i]: error for i, error in refused.items()}


def test_no_stale_golden_files() -> None:
    stale = sorted(path for path in OUT.glob("*.yaml") if path.stem not in CASES)
    assert not stale, f"golden files without an input: {stale}"
