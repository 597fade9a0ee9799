"""Expected failures of the command line are one clear line that says what to do, with
no traceback: a missing or unusable ``lab --mesh`` file, a port that is taken."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def run(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controlplane", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def told(result: subprocess.CompletedProcess[str]) -> str:
    """The one line on stderr, after checking there is no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines()
             if line.startswith("controlplane")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def taken() -> Iterator[int]:
    """A port on 127.0.0.1 that this test holds open."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_lab_with_a_missing_mesh_file(tmp_path: Path) -> None:
    result = run("lab", "--mesh", "nowhere.yaml", "--duration", "1", cwd=tmp_path)
    assert result.returncode == 2
    line = told(result)
    assert "nowhere.yaml" in line and "No such file" in line and "leave out --mesh" in line


def test_lab_says_what_it_needs_from_the_mesh(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text(
        "services:\n  - name: shop\n    port: 80\n"
        "    endpoints: [{address: 127.0.0.1, port: 8080}]\n")
    result = run("lab", "--mesh", "mine.yaml", "--duration", "1", cwd=tmp_path)
    assert result.returncode == 2
    line = told(result)
    assert "has no service `frontend`" in line and "traffic generator calls it" in line
    helped = run("lab", "--help", cwd=tmp_path)
    assert "`frontend`" in helped.stdout and "traffic generator" in helped.stdout


def test_lab_with_an_invalid_or_binary_mesh_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("services:\n  - {name: frontend, port: true}\n")
    (tmp_path / "binary.yaml").write_bytes(b"services: [\xff\xfe]\n")
    bad = run("lab", "--mesh", "bad.yaml", "--duration", "1", cwd=tmp_path)
    assert bad.returncode == 2 and "bad.yaml" in bad.stderr and "port" in bad.stderr
    assert "Traceback" not in bad.stderr
    binary = run("lab", "--mesh", "binary.yaml", "--duration", "1", cwd=tmp_path)
    assert binary.returncode == 2
    assert "not UTF-8" in told(binary)


@pytest.mark.parametrize("flag", ["--xds-address", "--admin-address"])
def test_serve_on_a_taken_port(tmp_path: Path, taken: int, flag: str) -> None:
    (tmp_path / "mesh.yaml").write_text("services: []\n")
    other = "--admin-address" if flag == "--xds-address" else "--xds-address"
    result = run("serve", "--source", "file:mesh.yaml", flag, f"127.0.0.1:{taken}",
                 other, "127.0.0.1:0", "--snapshot-keep", "0", cwd=tmp_path)
    assert result.returncode == 1
    line = told(result)
    assert f"cannot listen on 127.0.0.1:{taken} ({flag})" in line
    assert f"choose another with {flag}" in line
    assert "Event loop is closed" not in result.stderr


def test_validate_warns_of_security_that_cannot_do_what_it_says(tmp_path: Path) -> None:
    """Valid, so it passes (0), but a rule naming callers needs mesh mTLS to match, and a
    strict service none of whose endpoints has a sidecar would refuse every caller."""
    (tmp_path / "mesh.yaml").write_text(
        "services:\n"
        "  - name: ratings\n"
        "    port: 9080\n"
        "    endpoints: [{address: 10.0.0.5, port: 9080}]\n"
        "    security:\n"
        "      mtls: {mode: strict}\n"
        "      authorization:\n"
        "        - {name: allow-reviews, from: [{service_accounts: [default/reviews]}]}\n")
    result = run("validate", "mesh.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok, 1 service" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if ": warning: " in line]
    assert len(warnings) == 2, result.stderr
    assert "authorization[0] (allow-reviews)" in warnings[0] and "--ca-dir" in warnings[0]
    assert "mtls mode strict, but no endpoint has a sidecar" in warnings[1]
