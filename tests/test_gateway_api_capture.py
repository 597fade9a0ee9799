"""MeshFrontend through transparent capture: an app calls a Service by name or by its
cluster IP, knowing nothing of the mesh; its captured sidecar routes the call by the
Service's HTTPRoute (GAMMA's "frontend" of a Service is its name and cluster IP). The
pods, apps and sidecars are tests/test_capture_e2e.py's, built again for this module.
"""

from __future__ import annotations

import pytest

from tests.support import pods
from tests.support.procs import wait_for
from tests.test_capture_e2e import REVIEWS_IP, Mesh, mesh  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.skipif(pods.available() is not None, reason=str(pods.available())),
    pytest.mark.xdist_group("capture_e2e"),  # pods on one bridge: one module at a time
]

# reviews-v2 is a Service of its own (its second pod); the route sends testers there.
ROUTES = """  - name: reviews-v2
    port: 9080
    endpoints: [{{address: {v2}, port: 9080}}]
http_routes:
  - name: reviews-testers
    parentRefs: [{{kind: Service, name: reviews, port: 9080}}]
    rules:
      - matches: [{{path: {{type: PathPrefix, value: /testers}}}}]
        backendRefs: [{{name: reviews-v2, port: 9080}}]
      - backendRefs: [{{name: reviews, port: 9080}}]
"""


def test_mesh_frontend_by_name_and_cluster_ip(mesh: Mesh) -> None:  # noqa: F811
    """MeshFrontend: calls to reviews by name and by cluster IP both take the route."""
    v2 = mesh.reviews[1]
    mesh.write(extra=ROUTES.format(v2=v2.address))
    try:
        wait_for(lambda: mesh.call("http://reviews:9080/testers")[1].startswith("reviews-v2"),
                 what="the route at productpage's sidecar", timeout=30)
        answers = mesh.calls(f"http://{REVIEWS_IP}:9080/testers/by-ip", count=5)
        assert {body.split()[0] for _, body, _ in answers} == {"reviews-v2"}, answers
        others = mesh.calls("http://reviews:9080/", count=10)
        assert {status for status, _, _ in others} == {200}
        assert {body.split()[0] for _, body, _ in others} <= {"reviews-v1", "reviews-v2"}
    finally:
        mesh.write()
        wait_for(lambda: any(body.startswith("reviews-v1") for _, body, _ in
                             mesh.calls("http://reviews:9080/testers", count=6)),
                 what="the first mesh again (no route)", timeout=60)
