"""The captured lab as a user runs it (as root): each demo app in a network namespace of
its own calls the next service by name, iptables sends the call through both sidecars,
a scenario works, and nothing of the lab remains after it stops, or after it is killed
(the next lab removes the leftovers)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane.lab import pods

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(pods.unavailable() is not None, reason=str(pods.unavailable())),
    # The lab prefers the mesh file's ports: one lab at a time (tests/test_lab.py too).
    pytest.mark.xdist_group("lab"),
]

HEALTHY = re.compile(r"frontend\s+[\d.]+ rps 100\.0% ok .*reviews\s+[1-9][\d.]* rps 100\.0% ok"
                     r".*ratings\s+[1-9][\d.]* rps 100\.0% ok")


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False).stdout


def _leftovers(number: int) -> list[str]:
    """What of lab network ``number`` exists on the machine."""
    found = [ns for ns in _run("ip", "netns", "list").split()
             if ns.startswith(f"cplab-{number}-")]
    found += re.findall(rf"^\d+: (cplab{number}(?:br|v\d+))[@:]", _run("ip", "-o", "link"),
                        re.MULTILINE)
    found += [str(p) for p in Path("/etc/netns").glob(f"cplab-{number}-*")]
    return found


def _crashed_leftovers(number: int, namespaces: dict[str, int]) -> list[str]:
    """What the killed lab ``number`` left: its own namespaces (by inode: a lab of another
    test worker may lease the same number afterwards and make namespaces of the same
    names), and the rest of its network unless a live lab now holds that number."""
    found = []
    for ns, inode in namespaces.items():
        try:
            if os.stat(f"/run/netns/{ns}").st_ino == inode:
                found.append(ns)
        except FileNotFoundError:
            pass
    handle = pods._lock(number)
    if handle is not None:  # nobody holds the number: nothing of it may remain
        try:
            found += _leftovers(number)
        finally:
            handle.close()
    return found


def _host_rules() -> list[str]:
    """The host's own iptables rules that would be the lab's (it adds none: its rules live
    in the pods' namespaces)."""
    text = _run("iptables-save")
    return [line for line in text.splitlines()
            if "CONTROLPLANE" in line or "cplab" in line or "10.240." in line]


def _admin(address: str, path: str) -> str:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://{address}:15000{path}", timeout=5) as response:
        return str(response.read().decode())


def _counter(address: str, pattern: str) -> int:
    """The sum of a sidecar's counters whose names match ``pattern`` (a regex)."""
    data = json.loads(_admin(address, "/stats?format=json&filter="
                             + urllib.parse.quote(pattern)))
    return sum(int(s.get("value", 0)) for s in data.get("stats", [])
               if "value" in s and re.search(pattern, s.get("name", "")))


class Lab:
    """``controlplane lab`` in a subprocess, its output read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "controlplane", "lab", "--headless",
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.pods: dict[str, tuple[str, str]] = {}  # node id -> (address, netns)
        self.number = -1

    def read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line:
            self.lines.append(line.rstrip())
            pod = re.match(r"\s+pod (\S+)\s+(\S+)\s.*\(ip netns exec (\S+) ", line)
            if pod:
                self.pods[pod.group(1)] = (pod.group(2), pod.group(3))
            bridge = re.search(r"pods on bridge cplab(\d+)br", line)
            if bridge:
                self.number = int(bridge.group(1))
        return line

    def until(self, pattern: str, seconds: float = 90) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            line = self.read()
            if not line:
                break
            if re.search(pattern, line):
                return line
        pytest.fail(f"no line matching {pattern!r} in time:\n" + self.shown())

    def shown(self) -> str:
        return "\n".join(self.lines[-60:])

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out or ""


@pytest.fixture
def lab_rules() -> Iterator[list[str]]:
    before = _host_rules()
    yield before
    assert _host_rules() == before


def test_captured_apps_call_by_name_through_both_sidecars_and_a_scenario_works(
        lab_rules: list[str]) -> None:
    lab = Lab("--scenario", "canary")
    try:
        first = lab.read()
        assert first.startswith("controlplane lab: capture mode:"), first
        lab.until(r"Ctrl-C stops everything")
        assert set(lab.pods) == {"frontend-v1", "reviews-v1", "reviews-v2", "ratings-v1",
                                 "loadgen"}, lab.shown()
        lab.until(HEALTHY.pattern)  # every service's inbound sidecar counts its calls
        # From outside the pods, as a user: through the ingress gateway on the host,
        # into the frontend's pod over mTLS as the gateway's identity.
        url = next(re.search(r"curl (http://\S+)$", line).group(1)  # type: ignore[union-attr]
                   for line in lab.lines if "the demo from outside" in line)
        outside = subprocess.run(["curl", "-sS", "--max-time", "5", url], capture_output=True,
                                 text=True, timeout=15, check=False)
        assert json.loads(outside.stdout)["caller"] == \
            "spiffe://cluster.local/ns/default/sa/ingress-controlplane", outside
        frontend, frontend_ns = lab.pods["frontend-v1"]
        reviews = [lab.pods[name][0] for name in ("reviews-v1", "reviews-v2")]

        # An ordinary call by name from the frontend's pod: the name is the virtual IP,
        # which no process owns; the frontend's sidecar routes it, a reviews sidecar
        # hands it to its app.
        hosts = Path(f"/etc/netns/{frontend_ns}/hosts").read_text()
        assert "10.96.0.11 reviews" in hosts, hosts
        egress = r"^cluster\.outbound\|9080\|[^|]*\|reviews\..*\.upstream_rq_completed$"
        before = _counter(frontend, egress)
        inbound = sum(_counter(a, r"^http\.inbound\.downstream_rq_2xx$") for a in reviews)
        call = subprocess.run(["ip", "netns", "exec", frontend_ns, "curl", "-sS",
                               "--max-time", "5", "http://reviews:9080/"],
                              capture_output=True, text=True, timeout=15, check=False)
        assert call.returncode == 0, call.stderr
        body = json.loads(call.stdout)
        assert body["service"] == "reviews" and body["ratings"]["service"] == "ratings", body
        # Over mTLS: reviews' app sees the frontend sidecar's identity, ratings' app
        # the reviews sidecar's (x-forwarded-client-cert, set by the inbound sidecar).
        assert body["caller"] == "spiffe://cluster.local/ns/default/sa/frontend", body
        assert body["ratings"]["caller"] == "spiffe://cluster.local/ns/default/sa/reviews"
        # The view prints the callers once the traffic generator has reported them: maybe
        # after the line that showed every service healthy.
        mtls = "mTLS: frontend called by spiffe://cluster.local/ns/default/sa/loadgen"
        if not any(line.startswith(mtls) for line in lab.lines):
            lab.until("^" + re.escape(mtls), seconds=30)
        assert _counter(frontend, egress) > before, _admin(frontend, "/stats?filter=reviews")
        assert sum(_counter(a, r"^http\.inbound\.downstream_rq_2xx$") for a in reviews) > inbound
        # The same call from the sidecar's UID, which capture leaves alone, reaches
        # nothing: no process owns the virtual IP, only capture makes the call work.
        bypass = subprocess.run(["ip", "netns", "exec", frontend_ns, "setpriv", "--reuid",
                                 "1337", "--regid", "1337", "--clear-groups", "curl", "-sS",
                                 "--max-time", "3", "http://reviews:9080/"],
                                capture_output=True, text=True, timeout=15, check=False)
        assert bypass.returncode != 0, bypass.stdout
        rules = _run("ip", "netns", "exec", frontend_ns, "iptables-save", "-t", "nat")
        assert re.search(r"^-A OUTPUT .*-j CONTROLPLANE_OUTPUT$", rules, re.MULTILINE), rules

        # The canary scenario moves reviews to v2 through the captured calls.
        mixes = []
        deadline = time.monotonic() + 90
        done = False
        while time.monotonic() < deadline:
            line = lab.read()
            if not line:
                break
            mix = re.search(r"reviews .*?\[v1 (\d+)% v2 (\d+)%\]", line)
            if mix and HEALTHY.search(line) and not done:
                mixes.append(int(mix.group(2)))
            done = done or "scenario canary: done" in line
            if done and re.search(r"reviews .*\[v1 0% v2 100%\]", line):
                break
        else:
            pytest.fail("the canary did not finish in time:\n" + lab.shown())
        assert any(v2 <= 25 for v2 in mixes), f"{mixes}\n{lab.shown()}"  # the 90/10 step
    finally:
        out = lab.stop()
    assert lab.proc.returncode == 0, f"{lab.shown()}\n{out}"
    assert "controlplane lab: stopped" in out, out
    assert lab.number >= 0 and _leftovers(lab.number) == [], _leftovers(lab.number)


def test_a_killed_labs_leftovers_are_removed_by_the_next_lab(lab_rules: list[str]) -> None:
    crashed = Lab()
    try:
        crashed.until(r"Ctrl-C stops everything")
        number = crashed.number
        envoys = [int(pid) for _, ns in crashed.pods.values()
                  for pid in _run("ip", "netns", "pids", ns).split()]
        namespaces = {ns: os.stat(f"/run/netns/{ns}").st_ino for _, ns in crashed.pods.values()}
        crashed.proc.kill()  # no cleanup at all: its pods and their processes stay
        crashed.proc.wait(10)
        assert _leftovers(number), "a SIGKILLed lab should leave its network behind"
    finally:
        crashed.stop()
    second = Lab("--duration", "3")
    try:
        second.until(r"controlplane lab: stopped")
        # The next lab to start removes them: this one says so, unless a lab that a
        # parallel test started meanwhile got there first (then there was nothing left).
        said = re.search(r"removed what a stopped lab left behind \(networks \[.*\b"
                         rf"{number}\b.*\]\)", second.shown())
        assert said or _crashed_leftovers(number, namespaces) == [], second.shown()
    finally:
        second.stop()
    assert _crashed_leftovers(number, namespaces) == []
    assert _crashed_leftovers(second.number, {}) == []  # unless a live lab took it since
    for pid in envoys:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text().lower(), f"{pid} left running"
    if os.path.exists(f"/proc/{crashed.proc.pid}"):
        pytest.fail("the killed lab is still running")


def test_a_host_that_drops_forwarded_traffic_still_runs_the_lab() -> None:
    """As on a Docker host: bridged traffic goes through the host's FORWARD chain
    (br_netfilter) whose policy is DROP. The lab lets its own bridge's traffic pass with
    one rule, and takes it away on exit. Run in a network namespace of the test's own,
    so this machine's firewall is not touched."""
    script = ("ip link set lo up && iptables -P FORWARD DROP && "
              f"{sys.executable} -m controlplane lab --headless --duration 15; "
              "echo RULES; iptables -S FORWARD")
    result = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True,
                            text=True, timeout=120, check=False)
    out = result.stdout
    lines = out.splitlines()
    assert any(HEALTHY.search(line) for line in lines), out[-3000:] + result.stderr[-2000:]
    rules = out.split("RULES", 1)[1]
    assert rules.split() == ["-P", "FORWARD", "DROP"], rules


def test_two_captured_labs_run_side_by_side() -> None:
    """A second lab takes the next network and free control plane ports; each runs its
    own pods, and neither removes the other's."""
    first = Lab()
    second: Lab | None = None
    try:
        first.until(r"Ctrl-C stops everything")
        second = Lab("--duration", "10")
        second.until(r"Ctrl-C stops everything")
        assert second.number != first.number and second.number >= 0, second.shown()
        if not any("another lab runs on this machine" in line for line in first.lines):
            # (the first holds the preferred ports unless a lab of another test did as it
            # started: then the second may find them free)
            assert any("another lab runs on this machine" in line for line in second.lines)
        second.until(HEALTHY.pattern)
        second.until(r"controlplane lab: stopped")
        first.until(HEALTHY.pattern)  # still whole after the second's start and stop
        assert _leftovers(first.number), "the second lab removed the first one's pods"
    finally:
        if second is not None:
            second.stop()
        first.stop()
    assert _leftovers(first.number) == [] and second is not None
    assert _crashed_leftovers(second.number, {}) == []  # unless a live lab took it since


def test_the_circuit_breaker_scenario_sheds_captured_traffic() -> None:
    """The scenario raises the traffic generator's rate in its pod (over its stdin), the
    breaker on reviews sheds the excess, and lifting it brings every call back."""
    lab = Lab("--scenario", "circuit-breaker")
    try:
        lab.until(HEALTHY.pattern)
        lab.until(r"scenario circuit-breaker: slow ratings")
        shed = lab.until(r"frontend\s+(?:[6-9]\d|1\d\d)\.\d rps\s+\d+\.\d% ok.*client errors")
        assert "100.0% ok" not in shed.split("|")[0], shed
        lab.until(r"scenario circuit-breaker: done")
        lab.until(r"^(?!.*client errors)\[.*frontend\s+(?:1\d|2\d)\.\d rps 100\.0% ok.*"
                  r"ratings\s+[1-9][\d.]* rps 100\.0% ok")
    finally:
        out = lab.stop()
    assert lab.proc.returncode == 0 and "controlplane lab: stopped" in out, out
