"""docker-compose.yml and `controlplane lab` describe the same mesh, and both are valid."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controlplane import generated
from controlplane.lab import compose
from controlplane.lab.envoy import find_envoy
from controlplane.lab.topology import plan_captured
from controlplane.mesh.loader import load_mesh_file

ROOT = Path(__file__).resolve().parent.parent


def test_checked_in_files_are_current() -> None:
    stale = generated.stale(compose.rendered(), ROOT)
    assert not stale, f"{stale} stale; run `python -m controlplane.lab.compose`, commit"


def test_compose_and_lab_run_the_same_services_on_the_same_ports(tmp_path: Path) -> None:
    lab = plan_captured(tmp_path, lambda i: f"10.240.0.{i + 2}")
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    lab_apps = {(i.service, i.version, i.app_port) for i in lab.instances}
    boxes = [b for b in compose.boxes() if b.app_port is not None]
    assert {(b.service, b.version, b.app_port) for b in boxes} == lab_apps
    assert all(b.name in services for b in compose.boxes())

    # The same mesh: same services, ports, cluster IPs, labels and policies; only the
    # endpoints' addresses differ.
    lab_mesh = load_mesh_file(lab.mesh_path)
    compose_mesh = load_mesh_file(ROOT / compose.MESH_FILE)
    strip = {"endpoints": {"__all__": {"address"}}}
    assert [s.model_dump(exclude=strip) for s in lab_mesh.services] == \
        [s.model_dump(exclude=strip) for s in compose_mesh.services]
    assert {e.address for s in compose_mesh.services for e in s.endpoints} == \
        {b.address for b in boxes}
    assert sorted(compose.virtual_hosts()) == sorted(
        f"{name}:{ip}" for name, ip in lab.virtual_ips.items())


def test_each_compose_pod_is_captured_and_calls_by_name() -> None:
    """Per app, as an injected pod: the app holds the network and the names of the
    services (their virtual IPs), an init container runs `controlplane capture` with
    NET_ADMIN and NET_RAW, Envoy runs as UID 1337 in the same network namespace; the
    apps' commands name the next service, never a sidecar port."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for box in compose.boxes():
        app, init, envoy = (services[box.name], services[f"{box.name}-init"],
                            services[f"{box.name}-envoy"])
        assert sorted(app["extra_hosts"]) == ["frontend:10.96.0.10", "ratings:10.96.0.12",
                                              "reviews:10.96.0.11"]
        assert app["networks"]["mesh"]["ipv4_address"] == box.address
        command = " ".join(app["entrypoint"])
        assert "--egress-port" not in command and "15001" not in command, command
        expected = {"frontend": "--call http://reviews:9080/",
                    "reviews": "--call http://ratings:9080/",
                    "ratings": "", "loadgen": "--url http://frontend:9080/"}[box.service]
        assert expected in command, command
        assert init["network_mode"] == envoy["network_mode"] == f"service:{box.name}"
        assert set(init["cap_add"]) == {"NET_ADMIN", "NET_RAW"} and init["user"] == "0"
        assert init["command"][0] == "capture"
        assert f"{box.name}-init" in envoy["depends_on"]
        assert envoy["user"] == "1337:1337"
        assert envoy["image"].startswith("envoyproxy/envoy:v1.40")
        # The init container's flags are ones `controlplane capture` takes.
        dry = subprocess.run([sys.executable, "-m", "controlplane", *init["command"],
                              "--dry-run"], capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0 and "CONTROLPLANE_OUTPUT" in dry.stdout, dry.stderr
        bootstrap = yaml.safe_load((ROOT / compose.ENVOY_DIR / f"{box.name}.yaml").read_text())
        assert bootstrap["node"]["metadata"]["capture"] == "true"


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
