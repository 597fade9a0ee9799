"""Bad mesh files written into a running server's file (each one seen in the field), and
the scenario that checks the server survives each: it stays up and ready, says what is
wrong (naming the field), the sidecar keeps the last good config with no failed request
and no NACK, and a following good change is still applied.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.chaos.harness import (
    Stack,
    alive,
    answered_by,
    healthz,
    mesh_text,
    server_sees,
    write_atomic,
)
from tests.support.procs import Backend, ControlPlane, wait_for


def _service(port: int, extra: str = "", endpoint: str = "", policy: str = "") -> bytes:
    endpoint = endpoint or f"{{address: 127.0.0.1, port: {port}}}"
    text = (f"services:\n  - name: reviews\n    port: 9080\n{extra}"
            f"    endpoints: [{endpoint}]\n")
    if policy:
        text += f"    policy: {policy}\n"
    return text.encode()


@dataclass(frozen=True)
class BadInput:
    """A file content (from the good backend's port); ``names``: what the error must
    mention (case-insensitive), None when the input may also be accepted."""

    content: Callable[[int], bytes]
    names: tuple[str, ...] | None


def _garbage(port: int) -> bytes:
    return random.Random(port).randbytes(64 * 1024)


BAD_INPUTS: dict[str, BadInput] = {
    "timeout-inf": BadInput(lambda p: _service(p, policy="{timeout: .inf}"), ("timeout",)),
    "timeout-9999999999999h": BadInput(
        lambda p: _service(p, policy="{timeout: 9999999999999h}"), ("timeout",)),
    "timeout-100000000h": BadInput(
        lambda p: _service(p, policy="{timeout: 100000000h}"), ("timeout",)),
    "non-utf8-byte": BadInput(
        lambda p: _service(p).replace(b"name: reviews", b"name: rev\xffiews"), ("utf",)),
    "empty-file": BadInput(lambda p: b"", ()),
    "no-services-key": BadInput(lambda p: b"servces: []\n", ("services",)),
    "not-a-mapping": BadInput(lambda p: b"- reviews\n- ratings\n", ("mapping",)),
    "deep-nesting": BadInput(lambda p: b"[" * 20000, ()),
    "binary-garbage": BadInput(_garbage, ()),
    "address-not-an-ip": BadInput(
        lambda p: _service(p, endpoint=f"{{address: not-an-ip, port: {p}}}"), ("address",)),
    "address-256.1.1.1": BadInput(
        lambda p: _service(p, endpoint=f"{{address: 256.1.1.1, port: {p}}}"), ("address",)),
    "port-true": BadInput(
        lambda p: _service(p, endpoint="{address: 127.0.0.1, port: true}"), ("port",)),
    "duplicate-key": BadInput(
        lambda p: _service(p, extra="    port: 9081\n"), ("port",)),
    "max-connections-over-2^32": BadInput(
        lambda p: _service(p, policy="{circuit_breaker: {max_connections: 99999999999}}"),
        ("max_connections",)),
    "rate-12345.677": BadInput(
        lambda p: _service(p, policy="{rate_limit: {requests_per_second: 12345.677}}"), None),
    "rate-1e30": BadInput(
        lambda p: _service(p, policy="{rate_limit: {requests_per_second: 1.0e+30}}"), None),
    "hash-header-newline": BadInput(
        lambda p: _service(p, policy='{load_balancer: {policy: ring_hash, '
                           'hash: {header: "x-user\\nx-evil"}}}'), ("header",)),
    "fallback-content-type-crlf": BadInput(
        lambda p: _service(p, policy='{fallback: {status: 503, body: down, '
                           'content_type: "text/plain\\r\\nx-evil: 1"}}'), ("content_type",)),
}

# Saves that pass through a bad state on the way to a good one.
SEQUENCES: tuple[str, ...] = ("truncate-then-write", "vanish-then-write")


def _warnings_after(server: ControlPlane, offset: int) -> list[str]:
    """Warning and error log lines the server wrote after byte ``offset`` of its log."""
    with open(server.log_path, "rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    found = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            found.append(line)  # not structured: a traceback or a crash
            continue
        if isinstance(entry, dict) and entry.get("level") in ("warning", "error", "critical"):
            found.append(line)
    return found


def _nacks(server: ControlPlane, node_id: str) -> list[str]:
    return [f"{kind}: {t['last_nack']}" for p in server.json("/debug/proxies")
            if p["node_id"] == node_id for kind, t in p["types"].items() if t["last_nack"]]


def _up(server: ControlPlane) -> bool:
    return alive(server) and healthz(server) == 200 and server.get("/readyz")[0] == 200


def bad_input(stack: Stack, case: str, window: float = 1.5) -> dict[str, Any]:
    """Write ``case`` (a BAD_INPUTS name or a SEQUENCES name) into the file of a running
    server with a sidecar under traffic; check everything the module docstring says."""
    good, moved = stack.backend("reviews-1"), stack.backend("reviews-2")
    write_atomic(stack.mesh, mesh_text({"reviews": [good]}))
    server = stack.server()
    envoy = stack.envoy("frontend-1", server.xds_port)
    wait_for(lambda: answered_by(envoy, "reviews", "reviews-1"), what="reviews routed")
    wait_for(lambda: server_sees(server, "frontend-1"), what="the sidecar ACKed")
    traffic = stack.run_traffic(envoy, "reviews")
    wait_for(lambda: traffic.ok >= 10, what="traffic flowing")
    offset = server.log_path.stat().st_size
    figures: dict[str, Any] = {"case": case}

    if case in SEQUENCES:
        _bad_then_good(stack, case, moved)
    else:
        bad = BAD_INPUTS[case]
        written = time.monotonic()
        write_atomic(stack.mesh, bad.content(good.port))
        if bad.names is not None:
            said = wait_for(lambda: _warnings_after(server, offset), timeout=15,
                            what=f"the server saying what is wrong with {case}")
            figures["reported_seconds"] = round(time.monotonic() - written, 2)
            text = "\n".join(said).lower()
            missing = [name for name in bad.names if name.lower() not in text]
            assert not missing, f"the error does not name {missing}: {said[:3]}"
        # The sidecar keeps the last good config for a while: nothing fails meanwhile.
        seen = traffic.ok
        wait_for(lambda: traffic.ok >= seen + int(20 * window), timeout=30,
                 what="traffic after the bad input")
        assert _up(server), "the server is not up and ready after a bad input"
        assert not _nacks(server, "frontend-1"), _nacks(server, "frontend-1")
        write_atomic(stack.mesh, mesh_text({"reviews": [moved]}, policy={"timeout": "2s"}))
    wait_for(lambda: answered_by(envoy, "reviews", "reviews-2"), timeout=15, interval=0.05,
             what="a good change after the bad input reaching the sidecar")
    traffic.stop()
    assert _up(server)
    assert not _nacks(server, "frontend-1"), _nacks(server, "frontend-1")
    crash = [line for line in _warnings_after(server, offset) if "Traceback" in line]
    assert not crash, crash[:3]
    assert traffic.failed == 0, traffic.summary()
    figures["traffic"] = traffic.summary()
    return figures


def _bad_then_good(stack: Stack, case: str, moved: Backend) -> None:
    """A save that passes through a 0-byte or missing file for a moment, as ``>`` and
    some editors and config tools do, then ends with a good (changed) mesh."""
    good_text = mesh_text({"reviews": [moved]})
    path: Path = stack.mesh
    if case == "truncate-then-write":
        with open(path, "wb"):
            pass  # truncated in place
        time.sleep(0.6)  # the state under test: a few polls see the empty file
        with open(path, "w") as handle:
            handle.write(good_text)
    else:
        path.unlink()
        time.sleep(0.6)  # the state under test: a few polls see no file
        write_atomic(path, good_text)
