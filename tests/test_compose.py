"""docker-compose.yml and `controlplane lab` describe the same mesh, and both are valid."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from controlplane import generated
from controlplane.lab import compose
from controlplane.lab.envoy import find_envoy
from controlplane.lab.topology import plan
from controlplane.mesh.loader import load_mesh_file

ROOT = Path(__file__).resolve().parent.parent


def test_checked_in_files_are_current() -> None:
    stale = generated.stale(compose.rendered(), ROOT)
    assert not stale, f"{stale} stale; run `python -m controlplane.lab.compose`, commit"


def test_compose_and_lab_run_the_same_services_on_the_same_ports(tmp_path: Path) -> None:
    lab = plan(tmp_path)
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = document["services"]
    lab_apps = {(i.service, i.version) for i in lab.instances}
    boxes = [b for b in compose.boxes() if b.app_port is not None]
    assert {(b.service, b.version) for b in boxes} == lab_apps
    for box in [*boxes, *(b for b in compose.boxes() if b.app_port is None)]:
        assert box.name in services and f"{box.name}-envoy" in services
        assert services[f"{box.name}-envoy"]["network_mode"] == f"service:{box.name}"
        assert services[f"{box.name}-envoy"]["image"].startswith("envoyproxy/envoy:v1.40")

    # The same mesh: same services, ports, labels and policies; only addresses differ.
    lab_mesh = load_mesh_file(lab.mesh_path)
    compose_mesh = load_mesh_file(ROOT / compose.MESH_FILE)
    strip = {"endpoints": {"__all__": {"address", "port"}}}
    assert [s.model_dump(exclude=strip) for s in lab_mesh.services] == \
        [s.model_dump(exclude=strip) for s in compose_mesh.services]
    compose_ports = [e.port for s in compose_mesh.services for e in s.endpoints]
    assert compose_ports == [b.inbound_port for b in boxes]
    assert {e.address for s in compose_mesh.services for e in s.endpoints} == \
        {b.address for b in boxes}


def test_every_sidecar_bootstrap_is_valid_envoy_config() -> None:
    for path in sorted((ROOT / compose.ENVOY_DIR).glob("*.yaml")):
        result = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{path.name}: {result.stdout}{result.stderr}"


def test_docker_compose_config_accepts_the_file() -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed; .ci/run installs it with apt-get")
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    result = subprocess.run([tool, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
