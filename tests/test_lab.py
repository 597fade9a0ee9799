"""`controlplane lab` as a user runs it: real sidecars, real traffic, clean shutdown."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


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


def test_lab_serves_traffic_and_stops_cleanly_on_sigint() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "controlplane", "lab"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    children: list[int] = []
    try:
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if not children and "Ctrl-C stops everything" in line:
                children = _children_of(proc.pid)
            healthy = re.search(
                r"frontend\s+\d+ rps 100\.0% ok .*ratings\s+\d+ rps 100\.0% ok", line)
            if healthy and "v1" in line and "v2" in line:
                break
        else:
            pytest.fail("lab did not report healthy traffic in time:\n" + "\n".join(lines))
        assert len(children) == 5, f"expected 5 Envoy sidecars, saw {children}"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "controlplane lab: stopped" in out
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
                f"/proc/{pid}/status").read_text().lower(), f"sidecar {pid} left running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
