"""The gateway Deployment is scraped like an injected pod: its pod template carries the
prometheus.io annotations naming the stats listener (15090, /stats/prometheus) that its
bootstrap serves, unless the Gateway's infrastructure already says where to scrape."""

from __future__ import annotations

from typing import Any

import yaml

from controlplane.bootstrap import CAPTURE_STATS_PORT, STATS_PATH
from controlplane.inject.config import InjectConfig
from controlplane.sources.kubernetes.deployer import desired, gateway_bootstrap
from tests.support.kube_gateways import gateway

HTTP = {"name": "http", "port": 80, "protocol": "HTTP"}


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    [deployment] = [o for _, o in desired(obj, InjectConfig(), gateway_bootstrap)
                    if o["kind"] == "Deployment"]
    template: dict[str, Any] = deployment["spec"]["template"]
    return template


def test_the_gateway_pod_is_annotated_for_scraping_its_stats_listener() -> None:
    obj = gateway("ingress", [HTTP])
    obj["metadata"]["uid"] = "u-1"
    template = pod_template(obj)
    annotations = template["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true",
                           "prometheus.io/port": str(CAPTURE_STATS_PORT),
                           "prometheus.io/path": STATS_PATH}
    # ... which is where its bootstrap serves the stats, labelled as the gateway's.
    [container] = template["spec"]["containers"]
    assert {"name": "http-envoy-prom", "containerPort": CAPTURE_STATS_PORT,
            "protocol": "TCP"} in container["ports"]
    boot = yaml.safe_load(gateway_bootstrap("default", "ingress", InjectConfig()))
    [stats] = [entry for entry in boot["static_resources"]["listeners"]
               if entry["name"] == "stats_prometheus"]
    assert stats["address"]["socket_address"]["port_value"] == CAPTURE_STATS_PORT
    assert {"tag_name": "source_service", "fixed_value": "ingress"} in \
        boot["stats_config"]["stats_tags"]


def test_the_gateways_own_scrape_annotations_win() -> None:
    own = {"prometheus.io/scrape": "false"}
    obj = gateway("ingress", [HTTP], infrastructure={"annotations": own})
    obj["metadata"]["uid"] = "u-1"
    assert pod_template(obj)["metadata"]["annotations"] == own
