"""bench/certs.py runs end to end at a tiny scale and reports what it promises: the CA's
rates, and a rotation of every simulated sidecar's certificate through the real server
(each stream its own identity, each rotated once, none lost). Figures are the bench's
job, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(180)]
BENCH = Path(__file__).resolve().parent.parent / "bench" / "certs.py"


def test_certs_bench_rotates_every_stream_once(tmp_path: Path) -> None:
    out = tmp_path / "certs.json"
    run = subprocess.run(
        [sys.executable, str(BENCH), "--streams", "20", "--cert-ttl", "40", "--issue", "50",
         "--deadline", "120", "--out", str(out)],
        capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    issuance = result["issuance"]
    assert issuance["workload_certs_issued"] == 50
    assert issuance["signatures_per_s"] > 0 and issuance["tokens_verified_per_s"] > 0
    rotation = result["rotation"]
    assert rotation["streams"] == 20 and rotation["streams_lost"] == 0, rotation
    assert rotation["push_bytes_server"] > 0 and rotation["response_bytes_read"] > 0
    # each stream got its own new certificate once (and perhaps the bundle): not a storm
    assert rotation["responses_per_stream_median"] <= 4, rotation
    assert "rotation of 20 certificates" in run.stdout
