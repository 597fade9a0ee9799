"""``controlplane status`` as a user runs it, against a real server and real Envoy
sidecars: the table, a NACK with Envoy's error, the --node diff, --wait for CI (0 once the
change is live, 1 naming a stopped sidecar), and exit 2 when no replica answers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import Backend, free_port, wait_for
from tests.test_csds import Fleet, write_mesh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    yield fleet
    fleet.close()


def status(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controlplane", "status", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def table(text: str) -> dict[str, dict[str, str]]:
    """The table's rows by node id, as column -> cell."""
    lines = text.splitlines()
    header = lines[0].split()
    rows = {}
    for line in lines[1:]:
        if not line.strip():
            break
        cells = line.split()
        if len(cells) != len(header):  # NOT SENT is two words
            line = line.replace("NOT SENT", "NOT_SENT")
            cells = line.split()
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def synced_table(port: int, nodes: set[str]) -> dict[str, dict[str, str]] | None:
    done = status("--server", f"127.0.0.1:{port}")
    assert done.returncode == 0, done.stderr
    rows = table(done.stdout)
    if set(rows) != nodes:
        return None
    for row in rows.values():
        if any(row[c] != "SYNCED" for c in ("CDS", "LDS", "EDS", "RDS")):
            return None
    return rows


def sent(fleet: Fleet, node: str, kind: str) -> str:
    [proxy] = [p for p in fleet.server.json("/debug/proxies") if p["node_id"] == node]
    version: str = proxy["types"][kind]["sent_version"]
    return version


def test_table_nack_and_node_diff(fleet: Fleet) -> None:
    port = fleet.server.xds_port
    fleet.envoy("frontend-1")
    fleet.envoy("frontend-2", delta=True)
    rows = wait_for(lambda: synced_table(port, {"frontend-1", "frontend-2"}),
                    what="both sidecars SYNCED in the table")
    assert rows["frontend-1"]["PROTOCOL"] == "sotw"
    assert rows["frontend-2"]["PROTOCOL"] == "delta"
    assert rows["frontend-1"]["SERVICE"] == "frontend"
    assert rows["frontend-1"]["NAMESPACE"] == "default"
    assert rows["frontend-1"]["REPLICA"] == socket.gethostname()  # the default --identifier

    # A sidecar whose inbound port is taken rejects its listeners.
    inbound, app = free_port(), free_port()
    taken = socket.socket()
    taken.bind(("127.0.0.1", inbound))
    taken.listen()
    fleet.held.append(taken)
    fleet.envoy("reviews-1", service="reviews", extra=[
        "--inbound-port", str(inbound), "--app-port", str(app), "--inbound-address",
        "127.0.0.1"])

    def nacked() -> subprocess.CompletedProcess[str] | None:
        done = status("--server", f"127.0.0.1:{port}")
        row = table(done.stdout).get("reviews-1")
        return done if row is not None and row["LDS"] == "NACKED" else None

    done = wait_for(nacked, what="reviews-1 NACKED in the table")
    rows = table(done.stdout)
    assert rows["reviews-1"]["CDS"] == "SYNCED"
    assert rows["frontend-1"]["LDS"] == "SYNCED"
    assert "NACKed (the proxy keeps its last good config):" in done.stdout
    [error] = [line for line in done.stdout.splitlines() if line.startswith("reviews-1 lds:")]
    assert str(inbound) in error and "bind" in error, error

    as_json = json.loads(status("--server", f"127.0.0.1:{port}", "-o", "json").stdout)
    proxies = {p["node"]: p for p in as_json["proxies"]}
    assert as_json["synced"] is False and as_json["unreachable"] == []
    assert proxies["reviews-1"]["types"]["lds"]["status"] == "NACKED"
    assert str(inbound) in proxies["reviews-1"]["types"]["lds"]["error"]

    # --node: the listeners the server serves that the sidecar never ACKed, the error.
    done = status("--server", f"127.0.0.1:{port}", "--node", "reviews-1")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith(f"reviews-1 (reviews.default, sotw) on {socket.gethostname()}")
    assert "LDS: NACKED (served version" in text and "ACKed none)" in text
    assert f"NACK: {error.split(': ', 1)[1][:60]}" in text
    added = [line for line in text.splitlines() if line.startswith("  + ")]
    assert any(f"{inbound}" in line or "inbound" in line for line in added), text
    assert "CDS: SYNCED\n  the proxy holds what the server serves" in text

    # The healthy sidecar, after a change it ACKs: nothing differs.
    done = status("--server", f"127.0.0.1:{port}", "--node", "frontend-2")
    assert done.returncode == 0 and "LDS: SYNCED" in done.stdout
    assert "+ " not in done.stdout and "NACK" not in done.stdout

    missing = status("--server", f"127.0.0.1:{port}", "--node", "nosuch")
    assert missing.returncode == 1
    assert "no proxy with node id 'nosuch'" in missing.stderr


def test_wait_returns_when_live_and_names_a_stopped_sidecar(fleet: Fleet) -> None:
    port = fleet.server.xds_port
    first = fleet.envoy("frontend-1")
    second = fleet.envoy("frontend-2", delta=True)
    wait_for(lambda: synced_table(port, {"frontend-1", "frontend-2"}), what="SYNCED")

    # A change: --wait returns 0 once both sidecars have it, and then they have it.
    extra = Backend("reviews-2")
    fleet.backends.append(extra)
    before = sent(fleet, "frontend-1", "eds")
    write_mesh(fleet.mesh, {"reviews": [fleet.backends[0].port, extra.port],
                            "ratings": [fleet.backends[1].port]})
    wait_for(lambda: sent(fleet, "frontend-1", "eds") != before, what="the change sent")
    done = status("--server", f"127.0.0.1:{port}", "--wait", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    assert "every proxy (2) is synced" in done.stderr
    for envoy in (first, second):
        _, clusters, _ = envoy.admin("/clusters")
        assert f"127.0.0.1:{extra.port}" in clusters, envoy.node_id

    # A stopped sidecar cannot ACK: --wait gives up after --timeout and names it.
    os.kill(second.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
    try:
        before = sent(fleet, "frontend-2", "eds")
        write_mesh(fleet.mesh, {"reviews": [extra.port], "ratings": [fleet.backends[1].port]})
        wait_for(lambda: sent(fleet, "frontend-2", "eds") != before,
                 what="the change sent to the stopped sidecar")
        done = status("--server", f"127.0.0.1:{port}", "--wait", "--timeout", "3")
    finally:
        os.kill(second.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
    assert done.returncode == 1, done.stderr
    assert "not synced after 3s: 1 of 2 proxies" in done.stderr
    [laggard] = [line for line in done.stderr.splitlines() if line.startswith("  ")]
    assert laggard.startswith(f"  frontend-2 ({socket.gethostname()}): ") and "STALE" in laggard
    assert "frontend-1" not in done.stderr
    # Once it runs again it catches up, and --wait says so.
    done = status("--server", f"127.0.0.1:{port}", "--wait", "--timeout", "30")
    assert done.returncode == 0, done.stderr


def test_no_replica_answering_exits_2_saying_what_to_check() -> None:
    done = status("--server", f"127.0.0.1:{free_port()}", "--connect-timeout", "0.5")
    assert done.returncode == 2
    assert "no connection within 0.5s (plaintext)" in done.stderr
    assert "no replica answered; check --server" in done.stderr
    bad = status("--token-file", "/nonexistent/token")
    assert bad.returncode == 2 and "cannot read /nonexistent/token" in bad.stderr
