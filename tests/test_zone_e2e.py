"""Zone preference for a captured sidecar with no ``--zone`` (issue 10, item 4), end to end:
pods are network namespaces (tests/support/pods.py), the sidecar a real Envoy as UID 1337
behind ``controlplane capture``, bootstrapped as the injector does (node id
``<pod>.<namespace>``, a service guessed from the pod's name, no zone).

The app in pod ``web-1`` calls ``http://reviews:9080/`` (a cluster IP no process owns):
at first both reviews pods answer (zone-a and zone-b). Once the mesh lists web-1 as an
endpoint of ``web`` in zone-b, as the EndpointSlice controller does once a pod is ready,
only the zone-b pod answers, over the same xDS stream; when the zone-b pod leaves,
traffic fails over to zone-a."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.bootstrap import capture_options, render_bootstrap
from tests.support import pods
from tests.support.files import write_atomic
from tests.support.procs import ControlPlane, http_get, wait_for
from tests.test_capture_e2e import APP, CLIENT

pytestmark = [
    pytest.mark.skipif(pods.available() is not None, reason=str(pods.available())),
    pytest.mark.xdist_group("zone_e2e"),
]

REVIEWS_IP = "10.234.0.10"
WEB_IP = "10.234.0.20"


@dataclass
class Zoned:
    network: pods.PodNetwork
    control: ControlPlane
    path: Path
    web: pods.Pod
    near: pods.Pod  # reviews in zone-b
    far: pods.Pod  # reviews in zone-a

    def write(self, web_listed: bool, near_listed: bool = True) -> None:
        web = (f"[{{address: {self.web.address}, port: 8000, pod: {self.web.name}, "
               "zone: zone-b}]" if web_listed else "[]")
        near = (f"\n      - {{address: {self.near.address}, port: 9080, pod: reviews-b, "
                "zone: zone-b}" if near_listed else "")
        write_atomic(self.path, f"""services:
  - name: reviews
    namespace: shop
    port: 9080
    cluster_ips: [{REVIEWS_IP}]
    endpoints:
      - {{address: {self.far.address}, port: 9080, pod: reviews-a, zone: zone-a}}{near}
  - name: web
    namespace: shop
    port: 8000
    cluster_ips: [{WEB_IP}]
    endpoints: {web}
""")

    def answers(self, count: int = 12) -> Counter[str]:
        """Which reviews pods answer ``count`` calls from the app in web-1."""
        run = self.web.call([sys.executable, "-c", CLIENT, "http://reviews:9080/", str(count)],
                            timeout=30 + 12 * count)
        assert run.returncode == 0, run.stderr
        return Counter(body.split()[0] if status == 200 else f"status {status}"
                       for status, body, _ in json.loads(run.stdout))


@pytest.fixture(scope="module")
def zoned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zoned]:
    workdir = tmp_path_factory.mktemp("zone-e2e")
    with pods.PodNetwork() as network:
        web = network.pod("web-1", hosts={"reviews": REVIEWS_IP})
        far, near = network.pod("reviews-a"), network.pod("reviews-b")
        path = workdir / "mesh.yaml"
        control = ControlPlane(path, workdir, extra=["--xds-address", f"{network.gateway}:0"])
        found = Zoned(network, control, path, web, near, far)
        found.write(web_listed=False)
        control.start()
        try:
            for pod in (far, near):
                pod.run([sys.executable, "-c", APP, "0.0.0.0", "9080", pod.name])
            web.capture()
            # As the injector bootstraps it: no zone; "web-1" is no service of the mesh.
            options = capture_options(f"{web.name}.shop", "web-1", namespace="shop",
                                      admin_address=web.address,
                                      xds_address=f"{network.gateway}:{control.xds_port}")
            web.envoy(render_bootstrap(options))
            wait_for(lambda: '"egress"' in admin(web, "/listeners?format=json"), timeout=30,
                     what=f"listeners of web-1's sidecar (log: {web.envoy_log})")
            yield found
        finally:
            control.stop()


def admin(pod: pods.Pod, path: str) -> str:
    status, body, _ = http_get(f"http://{pod.address}:15000{path}", timeout=5)
    assert status == 200, body
    return body


def test_a_captured_sidecar_prefers_its_pods_zone_once_the_mesh_lists_the_pod(
        zoned: Zoned) -> None:
    wait_for(lambda: set(zoned.answers()) == {"reviews-a", "reviews-b"}, timeout=30,
             what="both zones answer while web-1's zone is unknown")
    zoned.write(web_listed=True)
    wait_for(lambda: set(zoned.answers()) == {"reviews-b"}, timeout=30,
             what="only zone-b answers once web-1 is listed in zone-b")
    assert set(zoned.answers(20)) == {"reviews-b"}
    [stream] = [s for s in zoned.control.json("/debug/proxies")
                if s["node_id"] == "web-1.shop"]
    assert (stream["zone"], stream["service"]) == ("zone-b", "web")
    assert stream["bootstrap"] == {"service": "web-1", "zone": ""}
    # Its zone emptied: fail over to zone-a.
    zoned.write(web_listed=True, near_listed=False)
    wait_for(lambda: set(zoned.answers()) == {"reviews-a"}, timeout=30,
             what="zone-a takes over when zone-b has no endpoint")
