"""`controlplane lab` as a user runs it: real sidecars, real traffic, clean shutdown."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

# The lab prefers the mesh file's ports (as the compose lab uses them): two labs at once
# would race for them, so the lab's tests share one xdist worker (`--dist loadgroup`).
one_lab_at_a_time = pytest.mark.xdist_group("lab")
MTLS_LINE = ("mTLS: frontend called by spiffe://cluster.local/ns/default/sa/loadgen, "
             "reviews called by spiffe://cluster.local/ns/default/sa/frontend, "
             "ratings called by spiffe://cluster.local/ns/default/sa/reviews")


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid:
            found.append(int(entry.name))
    return found


@one_lab_at_a_time
def test_lab_runs_a_scenario_and_stops_cleanly_on_sigint() -> None:
    """Headless explicit lab (no namespaces), every service answering through its
    sidecar, the canary scenario moving reviews from v1+v2 to v2 alone, then SIGINT: no
    process left behind. (tests/test_lab_capture.py runs the captured lab.)"""
    proc = subprocess.Popen([sys.executable, "-m", "controlplane", "lab", "--explicit",
                             "--headless", "--scenario", "canary"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    children: list[int] = []
    mixes: list[tuple[int, int]] = []
    healthy = done = False
    try:
        deadline = time.monotonic() + 90
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if not children and "Ctrl-C stops everything" in line:
                children = _children_of(proc.pid)
            if re.search(r"frontend\s+[\d.]+ rps 100\.0% ok .*ratings\s+[\d.]+ rps 100\.0% ok",
                         line):
                healthy = True
                mix = re.search(r"reviews .*?\[v1 (\d+)% v2 (\d+)%\]", line)
                if mix and not done:
                    mixes.append((int(mix.group(1)), int(mix.group(2))))
            if "scenario canary: done" in line:
                done = True
            if done and re.search(r"reviews .*\[v1 0% v2 100%\]", line):
                break
        else:
            pytest.fail("lab did not finish the scenario in time:\n" + "\n".join(lines))
        shown = "\n".join(lines)
        assert len(children) == 6, f"expected 5 sidecars and a gateway, saw {children}:\n{shown}"
        # The demo from outside, as a user reaches it: through the ingress gateway's
        # HTTP listener (the lab's Gateway and HTTPRoute), into the mesh over mTLS as
        # the gateway's own identity.
        found = re.search(r"curl (http://127\.0\.0\.1:\d+/)$", shown, re.MULTILINE)
        assert found is not None and "ingress gateway:" in shown, shown
        with urllib.request.urlopen(found.group(1), timeout=5) as answer:
            body = json.loads(answer.read())
        assert body["service"] == "frontend", body
        assert body["caller"] == "spiffe://cluster.local/ns/default/sa/ingress-controlplane", body
        assert body["reviews"]["ratings"]["service"] == "ratings", body
        assert healthy, f"no line with every service at 100% ok:\n{shown}"
        # The lab runs a CA: every call between sidecars is mTLS, and each app sees the
        # SPIFFE ID of its caller's sidecar.
        assert "identity: the lab's CA in" in shown, shown
        assert MTLS_LINE in lines, shown
        assert any(40 <= v2 <= 60 for _, v2 in mixes[:3]), f"{mixes}\n{shown}"  # round robin
        assert any(v2 <= 25 for _, v2 in mixes), f"{mixes}\n{shown}"  # the 90/10 step showed
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, f"{shown}\n{out}"
        assert "controlplane lab: stopped" in out, f"{shown}\n{out}"
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
                f"/proc/{pid}/status").read_text().lower(), f"sidecar {pid} left running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        for pid in children:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)


def test_the_first_line_says_the_mode_and_why() -> None:
    from controlplane.lab.runner import choose_mode

    captured, line = choose_mode(explicit=True)
    assert not captured and line.startswith("explicit mode (--explicit)"), line
    captured, line = choose_mode(explicit=False)
    if os.geteuid() != 0:
        assert not captured and "not root" in line and "as root" in line, line
    elif captured:
        assert line.startswith("capture mode:") and "--explicit" in line, line


def test_without_root_the_lab_runs_explicit_and_says_why(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from controlplane.lab.runner import choose_mode

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    captured, line = choose_mode(explicit=False)
    assert not captured, line
    assert line.startswith("explicit mode (not root: network namespaces and iptables need "
                           "root)"), line
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "iptables-restore"
                        else f"/usr/sbin/{tool}")
    captured, line = choose_mode(explicit=False)
    assert not captured and "apt-get install iptables" in line, line


def test_the_captured_plan_gives_every_service_a_virtual_ip(tmp_path: Path) -> None:
    """A --mesh without cluster_ips still runs captured: the lab's copy gets them."""
    from controlplane.lab.topology import plan_captured
    from controlplane.mesh.loader import load_mesh_file

    template = """services:
  - name: frontend
    port: 8000
    endpoints: [{address: 127.0.0.1, port: 8000}]
  - name: reviews
    port: 9080
    cluster_ips: [10.96.0.10]
    endpoints: [{address: 127.0.0.1, port: 9080}, {address: 127.0.0.1, port: 9080}]
"""
    layout = plan_captured(tmp_path, lambda i: f"10.240.7.{i + 2}", template, prefer=False)
    assert layout.virtual_ips == {"frontend": "10.96.0.11", "reviews": "10.96.0.10"}
    assert layout.service_ports == {"frontend": 8000, "reviews": 9080}
    assert [(i.node_id, i.address, i.app_port) for i in layout.instances] == [
        ("frontend-v1", "10.240.7.2", 8000), ("reviews-v1", "10.240.7.3", 9080),
        ("reviews-v2", "10.240.7.4", 9080)]
    assert layout.loadgen.address == "10.240.7.5"
    mesh = load_mesh_file(layout.mesh_path)
    assert [e.address for s in mesh.services for e in s.endpoints] == [
        "10.240.7.2", "10.240.7.3", "10.240.7.4"]
    assert mesh.services[0].cluster_ips == ["10.96.0.11"]


def test_live_table_and_line_show_the_same_figures() -> None:
    import io

    from rich.console import Console

    from controlplane.lab.view import ServiceStats, render_line, render_table

    services = {"reviews": ServiceStats(requests=20, ok=19, p50_ms=1.0, p99_ms=0.2,
                                        versions={"v1": 15, "v2": 5})}
    console = Console(file=io.StringIO(), width=120)
    console.print(render_table(3.0, services, ["reviews", "ratings"], "scenario canary: x"))
    table = console.file.getvalue()  # type: ignore[attr-defined]
    assert "reviews" in table and "95.0%" in table and "v1 75% v2 25%" in table
    assert "<1ms" in table and "scenario canary: x" in table
    line = io.StringIO()
    render_line(3.0, services, ["reviews"], "", line)
    assert "reviews  20.0 rps  95.0% ok p50 1ms p99 <1ms [v1 75% v2 25%]" in line.getvalue()


@one_lab_at_a_time
def test_a_rejected_save_stays_in_the_view_until_fixed() -> None:
    """A bad save is shown on every line (and the table) until the file is fixed, while
    the sidecars keep answering from the last good mesh; the fix clears it."""
    # The lab's default mode: captured as root (as in CI), explicit elsewhere.
    proc = subprocess.Popen([sys.executable, "-m", "controlplane", "lab", "--headless"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        mesh: Path | None = None
        good = ""
        flagged = 0
        fixed = False
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            found = re.search(r"mesh file \(edit it live\): (\S+)", line)
            if found:
                mesh = Path(found.group(1))
                good = mesh.read_text()
            if mesh is not None and good and line.startswith("[") and not flagged \
                    and "100.0% ok" in line and mesh.read_text() == good:
                mesh.write_text(good.replace("port: 9080", "port: ninety", 1))
            if line.startswith("[") and "MESH FILE REJECTED" in line:
                assert "services[0] (frontend.default).port" in line, line
                assert "frontend" in line and "100.0% ok" in line, line  # still served
                flagged += 1
                if flagged == 3:  # three refreshes later, still there: fix it
                    assert mesh is not None
                    mesh.write_text(good)
            if flagged >= 3 and line.startswith("mesh file fixed"):
                fixed = True
            if fixed and line.startswith("[") and "REJECTED" not in line:
                break
        else:
            pytest.fail("no fix seen in time:\n" + "\n".join(lines))
        assert flagged >= 3 and fixed, "\n".join(lines)
        assert any(line.startswith("mesh file rejected") for line in lines)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_the_table_shows_the_mesh_problem_under_the_figures(tmp_path: Path) -> None:
    import asyncio
    import io

    from rich.console import Console

    from controlplane.lab.view import ServiceStats, render_table
    from controlplane.lab.watch import KEEPS, MeshWatch

    path = tmp_path / "mesh.yaml"
    path.write_text("services:\n  - {name: a, port: 80, protocl: http}\n")
    watch = MeshWatch(path)
    problems = asyncio.run(watch.check())
    assert problems and "protocl" in problems[0], problems
    console = Console(file=io.StringIO(), width=160)
    console.print(render_table(1.0, {"a": ServiceStats()}, ["a"], "", problems, KEEPS))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "Mesh file rejected" in text and "protocl" in text and "last good mesh" in text
    path.write_text("services:\n  - {name: a, port: 80, protocol: http}\n")
    assert asyncio.run(watch.check()) == [] and watch.summary() == ""


def test_a_sidecar_port_taken_meanwhile_is_one_clear_lab_error(tmp_path: Path) -> None:
    """Another process takes a sidecar's egress port between the lab's pick and Envoy's
    bind: the lab says so and what to do, instead of serving a sidecar with no egress."""
    import asyncio
    import socket

    import aiohttp

    from controlplane.lab.sidecars import Sidecar
    from controlplane.lab.topology import Instance, LabError
    from tests.support.procs import ControlPlane

    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services: []\n")
    server = ControlPlane(mesh, tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        instance = Instance("loadgen", "v1", "loadgen", 0, 0, taken, _free())

        async def run() -> str:
            sidecar = Sidecar(instance, tmp_path, server.xds_port)
            async with aiohttp.ClientSession() as session:
                await sidecar.start()
                try:
                    await sidecar.wait_ready(session)
                except LabError as exc:
                    return str(exc)
                finally:
                    await sidecar.stop()
            return "no error"

        try:
            server.start()
            told = asyncio.run(run())
        finally:
            server.stop()
    assert told == (f"sidecar loadgen: port 127.0.0.1:{taken} was taken by another process "
                    "meanwhile; run the lab again"), told


def _free() -> int:
    from controlplane.lab.topology import free_port
    return free_port()


def test_a_second_lab_on_the_machine_takes_free_ports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Envoy shares a listener port with another Envoy (SO_REUSEPORT): two labs on the
    mesh file's ports would split each other's traffic. One lab holds them at a time."""
    import tempfile

    from controlplane.lab.runner import _claim_preferred_ports
    from controlplane.lab.topology import plan

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    first = _claim_preferred_ports()
    assert first is not None
    try:
        assert _claim_preferred_ports() is None  # a second lab, meanwhile
        work = tmp_path / "second"
        work.mkdir()
        layout = plan(work, prefer=False)
        assert all(i.inbound_port not in (9170, 9180, 9182, 9190) for i in layout.instances)
    finally:
        first.close()
    again = _claim_preferred_ports()
    assert again is not None
    again.close()
