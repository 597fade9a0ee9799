"""Golden files for ingress gateways: each ``golden/gateway/in/<case>.yaml`` (a mesh
file with gateways and routes, plus a ``proxy:`` block naming the gateway proxy) must
give exactly ``out/<case>.yaml``: the Gateway's status (its conditions, each listener's
conditions and attachedRoutes), the status of every route with a Gateway parent, and the
gateway proxy's listeners and route tables. Regenerate with ``pytest
tests/test_gateway_golden.py --update-golden`` and review the diff like code. A real
Envoy takes these resources in ``tests/test_gateway_e2e.py``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import resource
from controlplane.mesh import Mesh, load_mesh_data
from controlplane.mesh.gateway_attach import gateway_attachments
from controlplane.mesh.loader import parse_mesh_yaml
from controlplane.mesh.route_status import Condition
from controlplane.proxy import ProxyIdentity
from controlplane.translator.gateway.translate import gateway_resources
from tests.test_translator_golden import to_dict

DATA = Path(__file__).parent / "golden" / "gateway"
IN, OUT = DATA / "in", DATA / "out"
CASES = sorted(path.stem for path in IN.glob("*.yaml"))


def load_case(name: str) -> tuple[Mesh, ProxyIdentity]:
    path = IN / f"{name}.yaml"
    data = parse_mesh_yaml(path.read_text(encoding="utf-8"))
    proxy = ProxyIdentity(**data.pop("proxy"))
    return load_mesh_data(data, origin=str(path)), proxy


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


def test_no_stale_golden_files() -> None:
    stale = sorted(path for path in OUT.glob("*.yaml") if path.stem not in CASES)
    assert not stale, f"golden files without an input: {stale}"
