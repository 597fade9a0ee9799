"""docker-compose.yml run as written, without Docker: each compose service's own command,
user, network and hosts, in network namespaces (there is no Docker engine here).

In a network namespace of the test's own (``unshare --net``, so the compose subnet
172.30.0.0/24 cannot clash with this machine's networks), a bridge holds the control
plane's address; per app container, a namespace at its ``ipv4_address`` whose hosts file
is its ``extra_hosts`` (and ``controlplane``, as Docker's DNS would answer). In it run,
as the file says: the ``-init`` service's ``controlplane capture``, the app's
entrypoint, and the ``-envoy`` service's Envoy as its ``user`` (1337) on the generated
bootstrap (the file's volumes mapped to the checkout). The traffic generator's own
output then shows every call answered, by both reviews versions: the compose lab's
apps reach each other by name through their captured sidecars.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.lab import pods
from controlplane.lab.envoy import find_envoy

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = "172.30.0.2"  # the controlplane service's address, on the bridge itself

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(pods.unavailable() is not None or shutil.which("unshare") is None,
                       reason=str(pods.unavailable() or "needs unshare (util-linux)")),
]


def _mapped(text: str, volumes: list[str]) -> str:
    """A container path in ``text`` as the checkout's file its volume mounts."""
    for volume in volumes:
        source, target = volume.split(":")[:2]
        text = text.replace(target, str(ROOT / source.removeprefix("./")))
    return text


def _python(argv: list[str]) -> list[str]:
    return [sys.executable, *argv[1:]] if argv[0] == "python" else argv


def _whole(line: str) -> bool:
    """A traffic generator's line (``requests 20 statuses {200: 20} reviews {'v1': 10,
    'v2': 10} p50 4.1ms``) with every call answered 200, by both reviews versions."""
    statuses = line.partition("statuses {")[2].partition("}")[0]
    return (statuses.startswith("200: ") and statuses[5:].isdigit()
            and "'v1'" in line and "'v2'" in line)


def _diagnose(namespaces: list[str], apps: list[str]) -> dict[str, str]:
    """What each sidecar's admin says of its upstreams, for a failure's message."""
    found = {}
    for ns, name in zip(namespaces, apps, strict=False):
        got = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "--max-time", "2",
                              "http://127.0.0.1:15000/clusters"], capture_output=True,
                             text=True, timeout=10, check=False).stdout
        found[name] = "\n".join(line for line in got.splitlines()
                                if "::health_flags::" in line or "::rq_total::" in line)
    return found


def _inner(workdir: Path, seconds: float) -> dict[str, Any]:
    """Runs inside the test's network namespace: the compose file's services, then what
    the traffic generator printed."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    procs: list[subprocess.Popen[bytes]] = []
    namespaces: list[str] = []
    tag = f"cpcompose{os.getpid()}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    try:
        ip("link", "set", "lo", "up")
        # A fixed MAC, as Docker gives its bridges: one taken from the lowest port would
        # change as pods join, under the pods that already resolved the control plane.
        ip("link", "add", "mesh", "address", "02:42:ac:1e:00:02", "type", "bridge")
        ip("addr", "add", f"{GATEWAY}/24", "dev", "mesh")
        ip("link", "set", "mesh", "up")
        control = services["controlplane"]
        command = [_mapped(word, control["volumes"]).replace("/tmp/snapshots",
                                                             str(workdir / "snapshots"))
                   for word in control["command"]]
        procs.append(subprocess.Popen([sys.executable, "-m", "controlplane", *command],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        traffic: subprocess.Popen[bytes] | None = None
        apps = [n for n, s in services.items() if f"{n}-init" in services]
        for index, name in enumerate(apps):
            app, init, envoy = services[name], services[f"{name}-init"], services[f"{name}-envoy"]
            ns = f"{tag}-{index}"
            namespaces.append(ns)
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            hosts = [f"{GATEWAY} controlplane", "127.0.0.1 localhost"]
            hosts += [f"{h.split(':')[1]} {h.split(':')[0]}" for h in app["extra_hosts"]]
            (etc / "hosts").write_text("\n".join(hosts) + "\n")
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1\n")
            ip("netns", "add", ns)
            ip("link", "add", f"v{index}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", f"v{index}", "master", "mesh", "up")
            ip("-n", ns, "addr", "add", f"{app['networks']['mesh']['ipv4_address']}/24",
               "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "route", "add", "default", "via", GATEWAY)
            prefix = ["ip", "netns", "exec", ns]
            assert init["user"] == "0"
            subprocess.run([*prefix, sys.executable, "-m", "controlplane", *init["command"]],
                           check=True, capture_output=True, timeout=60)
            out = subprocess.PIPE if name == "loadgen" else subprocess.DEVNULL
            started = subprocess.Popen([*prefix, *_python(app["entrypoint"])], stdout=out,
                                       stderr=subprocess.DEVNULL)
            procs.append(started)
            if name == "loadgen":
                traffic = started
            uid, gid = envoy["user"].split(":")
            args = [_mapped(word, envoy["volumes"]) for word in envoy["command"]]
            with open(workdir / f"{name}-envoy.log", "ab") as log:
                procs.append(subprocess.Popen(
                    [*prefix, "setpriv", "--reuid", uid, "--regid", gid, "--clear-groups",
                     find_envoy(), *args, "--disable-hot-restart"], stdout=log, stderr=log))
        gateway = services.get("ingress-gateway")
        gateway_ip = gateway["networks"]["mesh"]["ipv4_address"] if gateway else ""
        if gateway is not None:  # its own container on the network, no capture
            ns = f"{tag}-gw"
            namespaces.append(ns)
            (Path("/etc/netns") / ns).mkdir(parents=True, exist_ok=True)
            (Path("/etc/netns") / ns / "hosts").write_text(f"{GATEWAY} controlplane\n")
            ip("netns", "add", ns)
            ip("link", "add", "vgw", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", "vgw", "master", "mesh", "up")
            ip("-n", ns, "addr", "add", f"{gateway_ip}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            args = [_mapped(word, gateway["volumes"]) for word in gateway["command"]]
            with open(workdir / "ingress-gateway-envoy.log", "ab") as log:
                procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, find_envoy(), *args, "--disable-hot-restart"],
                    stdout=log, stderr=log))
        assert traffic is not None and traffic.stdout is not None
        lines = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            line = traffic.stdout.readline().decode().strip()
            if not line:
                break
            lines.append(line)
            if len([x for x in lines if _whole(x)]) >= 3:
                break
        outside = ""
        if gateway is not None:  # the demo from outside: the gateway's published port
            port = gateway["ports"][0].split(":")[1]
            for _ in range(30):
                outside = subprocess.run(
                    ["curl", "-sS", "--max-time", "3", f"http://{gateway_ip}:{port}/"],
                    capture_output=True, text=True, timeout=10, check=False).stdout
                if '"service": "frontend"' in outside:
                    break
                time.sleep(0.5)
        return {"lines": lines, "sidecars": _diagnose(namespaces, apps), "outside": outside}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def test_the_compose_lab_calls_by_name_through_captured_sidecars(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-m", "tests.test_lab_compose", str(tmp_path),
         "40"], cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = json.loads(result.stdout)["lines"]
    logs = {p.name: p.read_text()[-1500:] for p in tmp_path.glob("*-envoy.log")}
    shown = "\n".join(lines) + json.dumps(logs, indent=1) + json.dumps(
        json.loads(result.stdout)["sidecars"], indent=1)
    assert len([line for line in lines if _whole(line)]) >= 3, shown
    # The compose lab's ingress gateway reaches the demo from outside the pods.
    outside = json.loads(result.stdout)["outside"]
    assert json.loads(outside)["service"] == "frontend", shown + outside


if __name__ == "__main__":
    print(json.dumps(_inner(Path(sys.argv[1]), float(sys.argv[2]))))
