"""Grafana dashboards for the mesh's traffic and the control plane, written as JSON into
deploy/grafana/ by ``python -m controlplane.deploy`` (a test fails when they are stale).

Beside the pipeline: it imports none of it; metric names are written out, and a test
checks each against a real scrape of the control plane and of a sidecar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

from controlplane.dashboards.control import control_plane_dashboard
from controlplane.dashboards.mesh import mesh_dashboard
from controlplane.dashboards.promql import dashboard_metrics, metric_names

__all__ = ["DIR", "control_plane_dashboard", "dashboard_metrics", "mesh_dashboard",
           "metric_names", "rendered"]

DIR: Final = Path("deploy/grafana")


def rendered() -> dict[Path, str]:
    """Every dashboard file, by its path in the repository."""
    return {DIR / "mesh.json": json.dumps(mesh_dashboard(), indent=2) + "\n",
            DIR / "controlplane.json": json.dumps(control_plane_dashboard(), indent=2) + "\n"}
