"""Runs a README block as written, command by command, and prints what each did as JSON:
``python -m tests.support.quickstart README WORKDIR [HEADING]`` (the first ``sh`` block
under HEADING, "## Running it yourself" by default).

Run inside a network namespace of its own (tests/test_readme_quickstart.py does), so
the documented ports are free. Commands ending in ``&`` run in the background, as in a
shell, and the next command waits until they are up (the port the command names, or the
documented default), as a person would; the rest run to completion. Every process
started here is ended here, by its PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.procs import end, http_get, wait_for

ACTIVATE = ". .venv/bin/activate"


QUICKSTART = "## Running it yourself"


def commands(readme: str, heading: str = QUICKSTART) -> list[str]:
    """The first ``sh`` block under ``heading``: one entry per command, continuation lines
    joined and comments dropped."""
    section = readme.split(heading, 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, f"the README lost the sh block of {heading!r}"
    joined = block.group(1).replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip()
        if command and not command.startswith("#"):
            found.append(re.sub(r"\s+", " ", command))
    return found


def up_check(command: str, workdir: Path) -> str:
    """The URL that answers once a background command is up."""
    if command.startswith("controlplane serve"):
        return "http://127.0.0.1:19000/readyz"  # the documented default admin address
    if command.startswith("envoy "):
        config = re.search(r"-c (\S+)", command)
        port = 9901  # the bootstrap's default admin port
        if config and (workdir / config.group(1)).exists():
            found = re.search(r"admin:.*?port_value: (\d+)",
                              (workdir / config.group(1)).read_text(), re.S)
            port = int(found.group(1)) if found else port
        return f"http://127.0.0.1:{port}/ready"
    served = re.search(r"http\.server (\d+)", command)
    if served:
        return f"http://127.0.0.1:{served.group(1)}/"
    raise AssertionError(f"the README runs {command!r} in the background, and this runner "
                         "does not know what shows it is up: add it to up_check")


def run(readme: Path, workdir: Path, heading: str = QUICKSTART) -> list[dict[str, Any]]:
    steps = commands(readme.read_text(encoding="utf-8"), heading)
    if steps[0] != ACTIVATE:  # a later block: the venv is on PATH here anyway
        assert heading != QUICKSTART, steps[0]
        steps.insert(0, ACTIVATE)
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
           "VIRTUAL_ENV": str(Path(venv_bin).parent)}
    started: list[subprocess.Popen[bytes]] = []
    report: list[dict[str, Any]] = [{"command": ACTIVATE, "done": "PATH set"}]
    try:
        for index, command in enumerate(steps[1:], 1):
            if command.endswith("&"):
                log = open(workdir / f"step-{index}.log", "wb")  # noqa: SIM115
                started.append(subprocess.Popen(
                    ["bash", "-c", "exec " + command[:-1]], cwd=workdir, env=env,
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
                log.close()
                url = up_check(command, workdir)

                def up(url: str = url) -> bool:
                    return http_get(url)[0] == 200
                wait_for(up, timeout=30, what=command)
                report.append({"command": command, "up": url})
            else:
                done = subprocess.run(["bash", "-c", command], cwd=workdir, env=env,
                                      capture_output=True, text=True, timeout=60)
                report.append({"command": command, "rc": done.returncode,
                               "stdout": done.stdout[-2000:], "stderr": done.stderr[-2000:]})
    finally:
        for proc in reversed(started):
            end(proc)
    return report


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # still end what was started
    heading = sys.argv[3] if len(sys.argv) > 3 else QUICKSTART
    print(json.dumps(run(Path(sys.argv[1]), Path(sys.argv[2]), heading)))


if __name__ == "__main__":
    main()
