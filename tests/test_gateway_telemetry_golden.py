"""Golden files for what a gateway proxy is served besides its routing: telemetry on its
listeners (the JSON access log on every connection manager and TCP proxy, tracing when
the mesh turns it on, nothing when it turns them off) and its scope (the clusters and
load assignments of the services its routes send to, and of nothing else).

Each ``golden/gateway_telemetry/in/<case>.yaml`` (a mesh file with a ``proxy:`` block
naming the gateway proxy) must give exactly ``out/<case>.yaml``, rendered from the
snapshot the real assembly builds for that proxy. Regenerate with ``pytest
tests/test_gateway_telemetry_golden.py --update-golden`` and review the diff like code.
A real Envoy takes every case's snapshot as its whole config (so every cluster a route
names is in the gateway's scope); ``tests/test_gateway_telemetry_e2e.py`` sends traffic.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from controlplane import resource
from controlplane.assembly.build import MeshBuild
from controlplane.cache.snapshot import Snapshot
from controlplane.mesh import Mesh
from controlplane.proxy import ProxyIdentity
from controlplane.translator import Resources
from controlplane.translator.gateway.scope import service_of
from tests.support.golden import Goldens, assert_envoy_accepts, to_dict

GOLDENS = Goldens(Path(__file__).parent / "golden" / "gateway_telemetry")
CASES = GOLDENS.cases


def snapshot(mesh: Mesh, proxy: ProxyIdentity) -> Snapshot:
    made = MeshBuild(mesh).snapshot(proxy)
    assert not made.problems(), made.problems()
    return made


def names(made: Snapshot, type_url: str) -> list[str]:
    typed = made.get(type_url)
    return sorted(typed.resources) if typed is not None else []


def render(mesh: Mesh, proxy: ProxyIdentity) -> str:
    made = snapshot(mesh, proxy)
    clusters = made.types[resource.CLUSTER].resources
    document = {
        "sees": sorted({key for name in clusters if (key := service_of(name))}),
        "clusters": names(made, resource.CLUSTER),
        "endpoints": names(made, resource.ENDPOINT),
        "own_clusters": [to_dict(r.message) for name, r in sorted(clusters.items())
                         if service_of(name) is None],
        "listeners": [to_dict(r.message) for _, r in
                      sorted(made.types[resource.LISTENER].resources.items())],
    }
    return yaml.safe_dump(document, sort_keys=False, width=100)


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, request: pytest.FixtureRequest) -> None:
    GOLDENS.check(case, render(*GOLDENS.load(case)), request)


def test_no_stale_golden_files(request: pytest.FixtureRequest) -> None:
    GOLDENS.check_no_stale(request)


def as_resources(made: Snapshot) -> Resources:
    return {type_url: [r.message for _, r in sorted(typed.resources.items())]
            for type_url, typed in made.types.items()}


def test_every_case_is_accepted_by_a_real_envoy() -> None:
    """The gateway's snapshot alone is a config Envoy takes: its access logs and tracer
    are valid, and each route's clusters are in its scope (static route tables check
    that every cluster they name exists)."""
    assert_envoy_accepts({case: as_resources(snapshot(*GOLDENS.load(case)))
                          for case in CASES})
