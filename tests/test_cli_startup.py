"""The ``controlplane`` command starts light: building the parser imports only the flag
modules, and a command's heavy modules load when that command runs.

Why: ``capture`` runs in every injected pod's init container (a 128Mi limit), ``certs``
beside every proxyless gRPC app for its whole life, ``bootstrap`` once per proxyless pod.
Each case runs the real command (``python -m controlplane ...``) in a fresh interpreter
and reads its ``sys.modules`` at exit; figures are in bench/cli_startup.py, not here.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.cli import build_parser

HEAVY = ("grpc", "google.protobuf", "envoy", "pydantic", "kubernetes", "cryptography",
         "aiohttp", "structlog", "yaml", "asyncio")

# Run the command as ``python -m controlplane`` does, then print the modules it loaded
# (after its own output, on stderr, behind a marker).
PROBE = """
import json, runpy, sys
sys.argv = ["controlplane", *json.loads(sys.argv[1])]
code = 0
try:
    runpy.run_module("controlplane", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code or 0
sys.stderr.write("\\nMODULES " + json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def loaded(argv: list[str], cwd: Path) -> tuple[int, set[str]]:
    """(exit code, the heavy libraries loaded) of ``controlplane ARGV``."""
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)
    marker = done.stderr.rfind("MODULES ")
    assert marker >= 0, done.stderr[-2000:]
    report = json.loads(done.stderr[marker + len("MODULES "):])
    modules: list[str] = report["modules"]
    heavy = {lib for lib in HEAVY
             if any(name == lib or name.startswith(lib + ".") for name in modules)}
    return int(report["code"]), heavy


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["capture", "--help"],
    ["certs", "--help"],
    ["bootstrap", "--help"],
    ["serve", "--help"],
    ["ca", "show", "--help"],
    ["status", "--help"],
    ["inject", "--help"],
])
def test_help_loads_no_heavy_library(argv: list[str], tmp_path: Path) -> None:
    code, heavy = loaded(argv, tmp_path)
    assert code == 0
    assert heavy == set(), f"controlplane {' '.join(argv)} imported {sorted(heavy)}"


def test_each_command_loads_only_what_it_uses(tmp_path: Path) -> None:
    """A plain sidecar bootstrap needs YAML only; capture's dry run (its real path but
    iptables) needs its logs (structlog) but no gRPC, protobuf, pydantic, Kubernetes,
    cryptography or YAML."""
    out = str(tmp_path / "envoy.yaml")
    code, heavy = loaded(["bootstrap", "--node-id", "pod-1.default", "--service", "reviews",
                          "--capture", "-o", out], tmp_path)
    assert code == 0 and "node:" in Path(out).read_text(encoding="utf-8")
    assert heavy == {"yaml"}
    code, heavy = loaded(["capture", "--dry-run", "--exclude-address", "10.0.0.1:18000"],
                         tmp_path)
    assert code == 0
    assert heavy == {"structlog", "asyncio"}  # structlog imports asyncio itself


def test_a_command_still_loads_its_modules_when_it_runs(tmp_path: Path) -> None:
    """The lazy step really reaches the command: ``certs`` with no bootstrap fails as
    before (exit 2, the line saying what to give), after loading its gRPC agent."""
    code, heavy = loaded(["certs", "--bootstrap", ""], tmp_path)
    assert code == 2
    assert {"grpc", "structlog", "asyncio"} <= heavy


def test_copied_flag_defaults_match_their_sources() -> None:
    """Flag modules copy a few defaults instead of importing their (heavy) owners."""
    from controlplane.inject import inject_flags
    from controlplane.inject.config import InjectConfig
    from controlplane.security import ca, ca_flags, castore

    assert (ca_flags.CA_SECRET, ca_flags.ROOT_DAYS) == (castore.CA_SECRET, ca.ROOT_DAYS)
    config = dataclasses.asdict(InjectConfig())
    copied = {k: v for k, v in vars(inject_flags._DEFAULTS).items() if not k.startswith("_")}
    assert copied == {k: config[k] for k in copied}
    assert len(copied) == 8


def test_every_command_is_listed_with_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--help"])
    assert exited.value.code == 0
    listing = capsys.readouterr().out
    for name in ("serve", "bootstrap", "validate", "lab", "status", "capture", "inject",
                 "ca", "certs"):
        assert re.search(rf"^    {name}\b", listing, re.MULTILINE), listing
