"""Installing and removing the capture rules: the side-effect edge of capture.

Each change is one ``iptables-restore --noflush`` transaction (the whole script applies
or none of it, so a pod is never half captured), computed from the nat table as it is
(``iptables-save -t nat``) by the pure functions of ``capture``. Re-running leaves one
copy; ``clean`` removes our jumps and chains and nothing else. Failures become a
``CaptureError`` that says what to do: iptables missing (install it), not permitted
(the NET_ADMIN capability).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from controlplane.inject.capture import (
    CaptureConfig,
    CaptureError,
    clean_script,
    install_script,
    plan,
)

_TIMEOUT = 30.0
_DENIED = ("permission denied", "operation not permitted", "must be root")


@dataclass(frozen=True)
class Outcome:
    """What a run changed, per binary: the script applied (None: nothing to do)."""

    binary: str
    script: str | None
    rules: int


_BINARIES = {4: "iptables", 6: "ip6tables"}


def _tool(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        raise CaptureError([
            f"{binary} not found: controlplane capture programs the pod's traffic "
            f"capture with {binary} and {binary}-restore; install iptables (Debian: "
            "apt-get install iptables) in the image that runs it"])
    return found


def _run(argv: list[str], stdin: str | None = None) -> str:
    try:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                timeout=_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise CaptureError([f"{' '.join(argv)} did not finish in {_TIMEOUT:.0f}s (the "
                            "xtables lock held by another process?); run it again"]) from exc
    if result.returncode == 0:
        return result.stdout
    error = result.stderr.strip() or result.stdout.strip()
    if any(word in error.lower() for word in _DENIED):
        raise CaptureError([
            f"{os.path.basename(argv[0])}: not permitted ({error.splitlines()[-1]}): "
            "changing iptables needs the NET_ADMIN capability (and NET_RAW); run "
            "controlplane capture as root, in Kubernetes as an init container with "
            "securityContext.capabilities.add [NET_ADMIN, NET_RAW] and runAsUser 0"])
    raise CaptureError([f"{' '.join(argv)} failed (exit {result.returncode}): {error}"])


def saved_nat(binary: str = "iptables") -> str:
    """The nat table as ``iptables-save -t nat`` prints it."""
    return _run([_tool(f"{binary}-save"), "-t", "nat"])


def _restore(binary: str, script: str) -> None:
    _run([_tool(f"{binary}-restore"), "--noflush", "-w", "10"], stdin=script)


def install(config: CaptureConfig) -> list[Outcome]:
    """Make the nat table(s) hold exactly ``plan(config)`` in our chains. Planned for
    every family first, so a bad config changes nothing."""
    families = [4, 6] if config.ipv6 else [4]
    planned = [(_BINARIES[family], plan(config, family)) for family in families]
    outcomes = []
    for binary, rules in planned:
        _tool(binary)
        script = install_script(rules, saved_nat(binary))
        _restore(binary, script)
        outcomes.append(Outcome(binary, script, sum(1 for r in rules if r[2] == "-A")))
    return outcomes


def clean(ipv6: bool = False) -> list[Outcome]:
    """Remove our jumps and chains (and nothing else); a no-op where none are. IPv6 is
    cleaned too wherever ip6tables is installed, so a ``--clean`` without ``--ipv6``
    still undoes a capture made with it; its errors count only when ``ipv6`` was asked."""
    outcomes = []
    for family, binary in _BINARIES.items():
        if family == 6 and not ipv6 and shutil.which("ip6tables-save") is None:
            continue
        try:
            script = clean_script(saved_nat(binary))
            if script is not None:
                _restore(binary, script)
        except CaptureError:
            if family == 4 or ipv6:
                raise
            continue  # no IPv6 nat here: nothing of ours can be in it
        outcomes.append(Outcome(binary, script, 0))
    return outcomes
