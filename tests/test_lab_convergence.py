"""The lab's view says how far the last edit got ("your edit reached 5/5 sidecars in
140 ms", from the server's /debug/changes) and which sidecars reject their config (from
/debug/rejections, else /debug/proxies): rendered from the admin's JSON, and seen in a
real lab run after an edit."""

from __future__ import annotations

import asyncio
import io
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from rich.console import Console

from controlplane.lab.view import (
    Nack,
    ServiceStats,
    convergence_line,
    nack_lines,
    nacks_of_proxies,
    nacks_of_rejections,
    render_table,
)
from controlplane.lab.watch import ServerWatch
from tests.support.procs import Backend, ControlPlane, Envoy, wait_for

# As /debug/changes answers (design: newest first).
DONE = {"generation": 7, "observed_at": 1000.0, "published_at": 1000.01, "affected": 5,
        "acked": 5, "pending": 0, "disconnected": 0, "complete": True, "result": "converged",
        "seconds": {"p50": 0.09, "p99": 0.139, "max": 0.1404}, "laggards": []}
PENDING = {"generation": 8, "observed_at": 1000.0, "published_at": 1000.01, "affected": 5,
           "acked": 3, "pending": 2, "complete": False, "result": "pending", "seconds": None,
           "laggards": ["ratings-1", "reviews-v2"]}
LDS_ERROR = ("Error adding/updating listener(s) inbound|9080: cannot bind '127.0.0.1:9080': "
             "Address already in use")


def test_a_complete_change_says_how_many_sidecars_and_how_fast() -> None:
    assert convergence_line(DONE, now=1005.0) == (
        "your edit reached 5/5 sidecars in 140 ms", "green")
    slow = {**DONE, "affected": 1, "acked": 1, "seconds": {"max": 2.25}}
    assert convergence_line(slow, None)[0] == "your edit reached 1/1 sidecar in 2.2 s"


def test_a_pending_change_names_who_it_waits_for() -> None:
    text, style = convergence_line(PENDING, now=1001.5)
    assert text == ("your edit reached 3/5 sidecars so far 1.5 s after the save; "
                    "waiting for ratings-1, reviews-v2")
    assert style == "yellow"
    assert "after the save" not in convergence_line(PENDING, None)[0]


def test_a_change_that_did_not_converge_or_lost_sidecars() -> None:
    late = {**PENDING, "result": "not_converged", "pending": 2}
    text, style = convergence_line(late, 1040.0)
    assert text.startswith("your edit reached only 3/5 sidecars; not ratings-1, reviews-v2")
    assert "change.not_converged" in text and style == "bold red"
    fewer = {**DONE, "acked": 4, "disconnected": 1}
    assert convergence_line(fewer, None)[0] == (
        "your edit reached 4/5 sidecars in 140 ms (1 disconnected first)")
    dropped = {**PENDING, "result": "dropped"}
    assert "stopped following it" in convergence_line(dropped, None)[0]


def test_a_change_no_sidecar_uses() -> None:
    nobody = {**DONE, "affected": 0, "acked": 0, "seconds": None}
    assert convergence_line(nobody, 1.0)[0] == "your edit changed no connected sidecar's config"


def test_odd_json_is_shown_not_raised() -> None:
    for change in ({}, {"affected": "5", "seconds": "x"}, {"affected": 2, "laggards": [None]}):
        text, _ = convergence_line(change, 1.0)
        assert text.startswith("your edit")
    assert nacks_of_proxies({"not": "a list"}) == []
    assert nacks_of_proxies([None, {"types": []}, {"types": {"lds": None}}]) == []
    assert nacks_of_rejections(["x"]) == [] and nacks_of_rejections({"rejections": [1]}) == []


def proxy(node_id: str, nack_version: str | None, sent: str, acked: str) -> dict[str, Any]:
    """One proxy as /debug/proxies shows it, with an LDS state."""
    nack = None if nack_version is None else {"error": LDS_ERROR, "version": nack_version,
                                              "at": 1.0}
    return {"node_id": node_id, "types": {
        "lds": {"sent_version": sent, "acked_version": acked, "last_nack": nack},
        "cds": {"sent_version": "c1", "acked_version": "c1", "last_nack": None}}}


def test_nacks_standing_now_from_debug_proxies() -> None:
    proxies = [proxy("reviews-1", "v2", sent="v2", acked="v1"),   # rejects the latest
               proxy("reviews-2", "v2", sent="v2", acked="v1"),
               proxy("frontend-1", "v1", sent="v2", acked="v2"),  # an old NACK, since ACKed
               proxy("ratings-1", None, sent="v2", acked="v2")]
    nacks = nacks_of_proxies(proxies)
    assert nacks == [Nack("reviews-1", "lds", LDS_ERROR), Nack("reviews-2", "lds", LDS_ERROR)]
    (line,) = nack_lines(nacks)
    assert line.startswith("NACK: 2 sidecars (reviews-1, reviews-2) reject lds: Error adding")
    assert "Address already in use" in line and "keep their last accepted config" in line


def test_nacks_from_debug_rejections_name_their_origin() -> None:
    summary = {"proxies": 1, "rejections": [
        {"node_id": "frontend-1", "stream_id": 3, "type": "cds", "version": "abc",
         "error": "x" * 5000, "at": 1.0, "services": ["default/reviews"],
         "policies": [{"kind": "TrafficPolicy", "namespace": "default", "name": "reviews"}]},
        {"node_id": "frontend-2", "stream_id": 4, "type": "cds", "version": "abc",
         "error": "bad", "at": 1.0, "services": ["default/ratings"], "policies": []}],
        "objects": [], "untracked_origins": 0}
    lines = nack_lines(nacks_of_rejections(summary))
    assert len(lines) == 2
    policy, service = sorted(lines, key=lambda line: "ratings" in line)
    assert "(frontend-2) rejects cds from Service default/ratings: bad" in service
    assert "(frontend-1) rejects cds from TrafficPolicy default/reviews: xxx" in policy
    assert len(policy) < 400, "an Envoy error is cut, not printed whole"


def test_many_distinct_nacks_are_bounded() -> None:
    nacks = [Nack(f"n{i}", "lds", f"error {i}") for i in range(10)]
    lines = nack_lines(nacks, limit=3)
    assert len(lines) == 4 and lines[-1].startswith("NACK: ... and 7 more")


def test_the_table_shows_the_server_lines_under_the_figures() -> None:
    console = Console(file=io.StringIO(), width=160)
    lines = [convergence_line(DONE, 1.0),
             *[(line, "bold red") for line in nack_lines([Nack("r-1", "lds", "bad")])]]
    console.print(render_table(1.0, {"a": ServiceStats()}, ["a"], "", server=lines))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "your edit reached 5/5 sidecars in 140 ms" in text
    assert "NACK: 1 sidecar (r-1) rejects lds: bad" in text


def test_changes_made_before_the_lab_started_are_not_the_users_edits() -> None:
    watch = ServerWatch("http://127.0.0.1:1")
    assert watch._latest({"changes": [{**DONE, "generation": 2}]}) is None  # the baseline
    assert watch._latest({"changes": [{**DONE, "generation": 2}]}) is None
    newer = watch._latest({"changes": [PENDING, DONE, {**DONE, "generation": 2}]})
    assert newer is not None and newer["generation"] == 8
    assert watch._latest({"changes": "nonsense"}) is None


# --- a real server, a real lab ---------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_real_nack_is_shown_with_its_origin(tmp_path: Path) -> None:
    """A sidecar whose inbound port another process holds NACKs its listeners: the
    server's /debug/rejections names the service, /debug/proxies the NACK itself."""
    app = Backend("reviews-app")
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(yaml.safe_dump({"services": [{"name": "reviews", "port": 9080,
        "endpoints": [{"address": "127.0.0.1", "port": app.port}]}]}))
    server = ControlPlane(mesh, tmp_path).start()
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    envoy = None
    try:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        envoy = Envoy(tmp_path, "reviews-1", "reviews", server.xds_port,
                      extra=["--inbound-port", str(port), "--app-port", str(app.port),
                             "--inbound-address", "127.0.0.1"]).start()
        url = f"http://127.0.0.1:{server.admin_port}"

        async def poll(rejections: bool) -> list[tuple[str, str]]:
            async with aiohttp.ClientSession() as session:
                return await ServerWatch(url, rejections).poll(session)

        traced = wait_for(lambda: asyncio.run(poll(True)), what="the NACK in the view")
        (text, style), = traced
        assert text.startswith("NACK: 1 sidecar (reviews-1) rejects lds from Service "
                               "default/reviews: "), text
        assert f"cannot bind '127.0.0.1:{port}'" in text and style == "bold red"
        (text, _), = asyncio.run(poll(False))
        assert text.startswith("NACK: 1 sidecar (reviews-1) rejects lds: "), text
        assert f"cannot bind '127.0.0.1:{port}'" in text
    finally:
        if envoy is not None:
            envoy.stop()
        server.stop()
        holder.close()
        app.stop()


REACHED = re.compile(r"^your edit reached (\d+)/(\d+) sidecars? in (\d+(?:\.\d+)?) (ms|s)$")


@pytest.mark.e2e
@pytest.mark.xdist_group("lab")  # the lab prefers fixed ports: one lab at a time
@pytest.mark.timeout(150)
def test_a_real_lab_shows_how_far_an_edit_got() -> None:
    """The canary scenario edits the mesh file; the headless view then prints that its
    first edit reached every sidecar it changed, with the server's figure."""
    proc = subprocess.Popen([sys.executable, "-m", "controlplane", "lab", "--explicit",
                             "--headless", "--scenario", "canary"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reached: re.Match[str] | None = None
    try:
        assert proc.stdout is not None
        edited = False
        deadline = time.monotonic() + 100
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if line.startswith("scenario canary: ") and "90" in line:
                edited = True
            reached = REACHED.match(line.strip()) if edited else None
            if reached:
                break
        shown = "\n".join(lines)
        assert reached is not None, f"no convergence line after the edit:\n{shown}"
        acked, affected = int(reached.group(1)), int(reached.group(2))
        assert acked == affected >= 1, shown
        seconds = float(reached.group(3)) / (1000 if reached.group(4) == "ms" else 1)
        assert 0 < seconds < 30, shown
        assert not any(line.startswith("NACK:") for line in lines), shown
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
