"""Scoped sidecars, end to end: the real server, real Envoy sidecars, real HTTP.

A sidecar reaches exactly the services its ``sidecars`` entry (and ``exportTo``) let it
see: 200 from those, 404 for the rest, and Envoy's own config dump holds only their
clusters. Editing the entry in the mesh file widens or narrows it live, on a
state-of-the-world and a delta sidecar alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.files import write_atomic
from tests.support.procs import Backend, ControlPlane, Envoy, stop_all, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SERVICES = ["web.shop", "cart.shop", "payments.pay", "ledger.pay", "ratings.default",
            "internal.ops"]


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mesh = tmp / "mesh.yaml"
        self.backends = {key: Backend(key) for key in SERVICES}
        self.envoys: list[Envoy] = []
        self.server: ControlPlane | None = None

    def write(self, sidecars: list[dict[str, Any]]) -> None:
        """The mesh with these entries; internal.ops is exported to its namespace only.
        Written atomically, as editors do."""
        services = []
        for key, backend in self.backends.items():
            name, _, namespace = key.partition(".")
            service: dict[str, Any] = {
                "name": name, "namespace": namespace, "port": 9080,
                "endpoints": [{"address": "127.0.0.1", "port": backend.port}]}
            if key == "internal.ops":
                service["exportTo"] = ["."]
            services.append(service)
        write_atomic(self.mesh, yaml.safe_dump({"services": services, "sidecars": sidecars}))

    def envoy(self, key: str, delta: bool) -> Envoy:
        assert self.server is not None
        name, _, namespace = key.partition(".")
        envoy = Envoy(self.tmp, f"{name}-1", name, self.server.xds_port, delta,
                      ["--namespace", namespace]).start()
        self.envoys.append(envoy)
        return envoy

    def close(self) -> None:
        stop_all(self.envoys, self.server, self.backends.values())


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    rig.close()


def reach(envoy: Envoy) -> dict[str, int]:
    """The status of a call to each service (by ``name.namespace``) through ``envoy``."""
    found = {}
    for key in SERVICES:
        status, body, _ = envoy.request(key)
        assert status != 200 or body == key, (key, body)  # 200 only from the right one
        found[key] = status
    return found


def reachable(envoy: Envoy) -> set[str]:
    statuses = reach(envoy)
    assert set(statuses.values()) <= {200, 404}, statuses
    return {key for key, status in statuses.items() if status == 200}


def clusters(envoy: Envoy) -> set[str]:
    """The outbound clusters in Envoy's own config, as ``name.namespace``."""
    _, body, _ = envoy.admin("/config_dump?resource=dynamic_active_clusters")
    names = {c["cluster"]["name"] for c in json.loads(body).get("configs", [])}
    return {n.rsplit("|", 1)[1].removesuffix(".svc.cluster.local")
            for n in names if n.startswith("outbound|")}


def holds(envoy: Envoy, expected: set[str], what: str) -> None:
    """Envoy reaches exactly ``expected`` (404 for the rest) and holds only their
    clusters."""
    wait_for(lambda: reachable(envoy) == expected, timeout=30,
             what=f"{envoy.node_id} to reach {sorted(expected)} ({what})")
    wait_for(lambda: clusters(envoy) == expected, timeout=30,
             what=f"{envoy.node_id}'s clusters to be {sorted(expected)} ({what})")


def test_scoped_sidecars_reach_exactly_what_they_see_and_follow_edits(rig: Rig) -> None:
    shop = {"name": "shop", "namespace": "shop",
            "egress": [{"hosts": ["./*", "pay/payments"]}]}
    cart = {"name": "cart", "namespace": "shop", "workloadSelector": {"service": "cart"},
            "egress": [{"hosts": ["./*"]}]}
    rig.write([shop, cart])
    rig.server = ControlPlane(rig.mesh, rig.tmp).start()
    web_sidecar = rig.envoy("web.shop", delta=False)
    cart_sidecar = rig.envoy("cart.shop", delta=True)
    ops_sidecar = rig.envoy("tool.ops", delta=False)

    # The namespace entry for web; cart's own entry wins over it; ops has none.
    holds(web_sidecar, {"web.shop", "cart.shop", "payments.pay"}, "namespace entry")
    holds(cart_sidecar, {"web.shop", "cart.shop"}, "workload entry")
    # exportTo ["."]: internal.ops is there for its own namespace's sidecars only.
    holds(ops_sidecar, set(SERVICES), "no entry: everything exported to ops")

    # Widen both: ratings everywhere, every service of pay for cart. internal.ops stays
    # out of web's reach although named: it is not exported to shop.
    shop["egress"] = [{"hosts": ["./*", "pay/payments", "*/ratings", "ops/internal"]}]
    cart["egress"] = [{"hosts": ["./*", "pay/*"]}]
    rig.write([shop, cart])
    holds(web_sidecar, {"web.shop", "cart.shop", "payments.pay", "ratings.default"}, "widened")
    holds(cart_sidecar, {"web.shop", "cart.shop", "payments.pay", "ledger.pay"}, "widened")

    # Narrow: the namespace entry to cart alone, and cart's own entry removed (it falls
    # back to the namespace one). Clusters go away from both sidecars.
    shop["egress"] = [{"hosts": ["./cart"]}]
    rig.write([shop])
    holds(web_sidecar, {"web.shop", "cart.shop"}, "narrowed")
    holds(cart_sidecar, {"cart.shop"}, "narrowed, namespace entry")

    # No entries at all: every service exported to shop (internal.ops still is not).
    rig.write([])
    holds(web_sidecar, set(SERVICES) - {"internal.ops"}, "entries removed")
    assert reach(web_sidecar)["internal.ops"] == 404
