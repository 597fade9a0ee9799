"""The README's "Running it yourself", followed literally: its commands, as written, on
a machine with nothing else on the documented ports (a network namespace of our own, and
a /dev/shm of our own for Envoy's hot-restart memory), with real Envoy and real HTTP."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import netns

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def follow(tmp_path: Path, heading: str) -> list[dict[str, Any]]:
    """The block under ``heading`` run as written in a network namespace of its own."""
    reason = netns.available()
    if reason is not None:
        pytest.skip(reason)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    with netns.Namespace() as space:
        inner = (f"mount -t tmpfs tmpfs /dev/shm && exec {sys.executable} -m "
                 f"tests.support.quickstart {ROOT / 'README.md'} {tmp_path} "
                 f"{shlex.quote(heading)}")
        result = subprocess.run([*space.prefix(), "unshare", "--mount", "sh", "-c", inner],
                                cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    steps: list[dict[str, Any]] = json.loads(result.stdout)
    return steps


def test_running_it_yourself_works_as_written(tmp_path: Path) -> None:
    result = follow(tmp_path, "## Running it yourself")
    steps = {step["command"].split()[0] + " " + step["command"].split()[1]: step
             for step in result}
    validate = steps["controlplane validate"]
    assert validate["rc"] == 0 and "ok, 2 services" in validate["stdout"], validate
    assert steps["controlplane bootstrap"]["rc"] == 0, steps["controlplane bootstrap"]
    assert "reviews-1" in (tmp_path / "envoy.yaml").read_text()
    curls = [step for step in result if step["command"].startswith("curl")]
    assert len(curls) == 2, curls
    for step in curls:
        assert step["rc"] == 0 and "Directory listing for /" in step["stdout"], step


def test_zero_trust_works_as_written(tmp_path: Path) -> None:
    """The "Zero trust" block: a CA made on first start, two sidecars with minted tokens,
    reviews -> ratings over mTLS, and plaintext refused by strict ratings."""
    result = follow(tmp_path, "## Zero trust: identity, mTLS and authorization")
    made = [step for step in result if step["command"].startswith("controlplane bootstrap")]
    assert len(made) == 2 and all(step["rc"] == 0 for step in made), made
    assert (tmp_path / "reviews-1.token").exists() and (tmp_path / "ca" / "ca.crt").exists()
    via_mtls, plaintext = [step for step in result if step["command"].startswith("curl")]
    assert via_mtls["rc"] == 0 and "Directory listing for /" in via_mtls["stdout"], via_mtls
    assert plaintext["rc"] != 0 and "Directory listing" not in plaintext["stdout"], plaintext
