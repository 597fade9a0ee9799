"""deploy/grafana: current with the code, and dashboards Grafana can import as they are
(the structure its classic JSON model needs, a Prometheus data source variable, one
query per target). That their queries name metrics that exist is checked against real
scrapes in test_dashboards_scrape.py."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import dashboards, deploy, generated
from controlplane.dashboards.grafana import DATASOURCE, SCHEMA_VERSION, WIDTH
from tests.support.procs import ControlPlane, http_get

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(dashboards.rendered())


def load(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads((ROOT / path).read_text(encoding="utf-8"))
    return board


def all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in board["panels"]:
        found.append(panel)
        found += panel.get("panels", [])
    return found


def test_checked_in_dashboards_are_current() -> None:
    stale = generated.stale(dashboards.rendered(), ROOT)
    assert not stale, f"{stale} stale; run `python -m controlplane.deploy` and commit the result"
    on_disk = {p.relative_to(ROOT) for p in (ROOT / dashboards.DIR).rglob("*")}
    assert on_disk == set(dashboards.rendered()), "a file controlplane/dashboards does not render"


def test_deploy_writes_the_dashboards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one command that writes the manifests writes the dashboards too."""
    monkeypatch.chdir(tmp_path)
    deploy.main()
    for path, text in dashboards.rendered().items():
        assert (tmp_path / path).read_text(encoding="utf-8") == text


@pytest.mark.parametrize("path", FILES, ids=str)
def test_dashboard_has_what_grafana_needs(path: Path) -> None:
    board = load(path)
    assert board["schemaVersion"] >= SCHEMA_VERSION >= 39
    assert board["id"] is None, "an imported dashboard gets its id from Grafana"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", board["uid"]), board["uid"]
    assert board["title"] and "python -m controlplane.deploy" in board["description"]
    for key in ("time", "templating", "annotations", "panels"):
        assert key in board, key
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"

    panels = all_panels(board)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(isinstance(i, int) and i > 0 for i in ids)
    for panel in panels:
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"}, panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= WIDTH, panel
        if panel["type"] == "row":
            assert grid["w"] == WIDTH and not panel.get("targets")
            continue
        assert panel["type"] in ("timeseries", "stat"), panel["type"]
        assert panel["title"] and panel["description"], panel
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in targets:
            assert target["datasource"] == DATASOURCE
            assert target["expr"].strip()
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert target["expr"].count("{") == target["expr"].count("}"), target["expr"]
            # Every variable a query uses is defined (or is one of Grafana's own).
            for name in re.findall(r"\$(\w+)", target["expr"]):
                assert name.startswith("__") or name in variables, (name, target["expr"])
    assert not overlapping(panels), overlapping(panels)


def overlapping(panels: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Pairs of panels that cover the same grid cell (Grafana would push one down)."""
    cells: dict[tuple[int, int], str] = {}
    clashes = []
    for panel in panels:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                if (x, y) in cells:
                    clashes.append((cells[(x, y)], panel["title"]))
                cells[(x, y)] = panel["title"]
    return clashes


def test_mesh_dashboard_is_per_service_with_both_views() -> None:
    board = load(dashboards.DIR / "mesh.json")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "service"} <= set(variables)
    assert "$namespace" in variables["service"]["definition"]
    exprs = [t["expr"] for p in all_panels(board) for t in p.get("targets", [])]
    outbound = [e for e in exprs if "by (destination_namespace, destination_service" in e]
    inbound = [e for e in exprs if 'envoy_http_conn_manager_prefix="inbound"' in e]
    for view in (outbound, inbound):
        assert any("_rq_total" in e for e in view)
        assert any('envoy_response_code_class!="5"' in e for e in view)  # success rate
        for q in ("0.5", "0.99"):
            assert any(e.startswith(f"histogram_quantile({q},") and "_bucket" in e
                       and ", le)" in e for e in view), q


def test_control_plane_dashboard_shows_the_issue_figures() -> None:
    board = load(dashboards.DIR / "controlplane.json")
    names = dashboards.dashboard_metrics(board)
    for metric in ("controlplane_connected_proxies", "controlplane_xds_pushes_total",
                   "controlplane_xds_push_bytes_total",
                   "controlplane_convergence_seconds_bucket", "controlplane_xds_nacks_total",
                   "controlplane_proxy_nacks", "controlplane_mesh_updates_total",
                   "controlplane_changes_total",
                   "controlplane_snapshot_build_seconds_bucket"):
        assert metric in names, metric
    exprs = [t["expr"] for p in all_panels(board) for t in p.get("targets", [])]
    assert any(e.startswith("histogram_quantile(0.99,") and "convergence" in e for e in exprs)


@pytest.mark.parametrize(("expr", "names"), [
    ('rate(a_total{x="y"}[5m])', {"a_total"}),
    ("histogram_quantile(0.99, sum by (le, type) (rate(b_bucket[$__rate_interval])))",
     {"b_bucket"}),
    ("sum without (instance) (c) / on(job) group_left(zone) d", {"c", "d"}),
    ('count(e{l=~"a|b", m!="{x}"} > 1e3) unless max(f offset 1h) and bool g', {"e", "f", "g"}),
    ("sum by (pod) (h) or vector(0)", {"h"}),
    ("rate(i[5m:30s]) * Inf", {"i"}),
    ("topk(5, j:recorded:rate5m)", {"j:recorded:rate5m"}),
    ('{__name__="k"}', set()),
])
def test_metric_names_of_promql(expr: str, names: set[str]) -> None:
    assert dashboards.metric_names(expr) == names


def test_deployment_is_scraped_on_the_admin_port_that_serves_metrics() -> None:
    """The control plane's pods carry the prometheus.io annotations for /metrics on the
    admin port, the port a container port names and the NetworkPolicy admits."""
    path = ROOT / deploy.DIR / "03-deployment.yaml"
    (deployment,) = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    template = deployment["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true",
                           "prometheus.io/port": str(deploy.ADMIN_PORT),
                           "prometheus.io/path": "/metrics"}
    (container,) = template["spec"]["containers"]
    assert {"name": "http-admin", "containerPort": deploy.ADMIN_PORT,
            "protocol": "TCP"} in container["ports"]
    args = container["args"]
    assert args[args.index("--admin-address") + 1] == f"0.0.0.0:{deploy.ADMIN_PORT}"


def routable_address() -> str | None:
    """This host's address on its default route (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_prometheus_scrapes_the_pod_address_and_debug_stays_loopback(tmp_path: Path) -> None:
    """As the Deployment runs it (admin on every address): a scrape from the pod's network
    gets /metrics, with the convergence metrics the dashboard reads; the views of what
    proxies hold (/debug/changes, /debug/rejections) answer loopback only."""
    address = routable_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to connect from")
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services:\n  - {name: reviews, port: 9080, endpoints: []}\n")
    server = ControlPlane(mesh, tmp_path, extra=["--admin-address", "0.0.0.0:0"]).start()
    try:
        status, text, _ = http_get(f"http://{address}:{server.admin_port}/metrics")
        assert status == 200
        for family in ("controlplane_convergence_seconds", "controlplane_changes_total",
                       "controlplane_connected_proxies"):
            assert f"# TYPE {family} " in text, family
        for path in ("/debug/changes", "/debug/rejections", "/debug/proxies"):
            status, body, _ = http_get(f"http://{address}:{server.admin_port}{path}")
            assert status == 403 and "kubectl port-forward" in body, (path, body)
            assert server.get(path)[0] == 200, path
    finally:
        server.stop()
