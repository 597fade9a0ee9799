"""Scenarios a person runs against the live lab: timed edits of the lab's mesh file.

Each step edits the same file a person would (and could, by hand), so the control plane
picks it up exactly as it would a hand edit, and the view shows it take effect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Mesh = dict[str, Any]


@dataclass(frozen=True)
class Step:
    after: float  # seconds after the previous step
    says: str
    change: Callable[[Mesh], None]
    rate: float | None = None  # the traffic generator's new rate, if it changes


@dataclass(frozen=True)
class Scenario:
    summary: str
    steps: tuple[Step, ...]


def _service(mesh: Mesh, name: str) -> dict[str, Any]:
    for service in mesh["services"]:
        if service["name"] == name:
            return service  # type: ignore[no-any-return]
    raise KeyError(f"the lab mesh has no service {name!r}")


def _policy(mesh: Mesh, name: str) -> dict[str, Any]:
    service = _service(mesh, name)
    return service.setdefault("policy", {})  # type: ignore[no-any-return]


def _split(v1: int, v2: int) -> Callable[[Mesh], None]:
    def change(mesh: Mesh) -> None:
        _policy(mesh, "reviews")["split"] = [
            {"labels": {"version": "v1"}, "weight": v1},
            {"labels": {"version": "v2"}, "weight": v2}]
    return change


def _set(service: str, field: str, value: Any) -> Callable[[Mesh], None]:
    def change(mesh: Mesh) -> None:
        if value is None:
            _policy(mesh, service).pop(field, None)
        else:
            _policy(mesh, service)[field] = value
    return change


def _both(*changes: Callable[[Mesh], None]) -> Callable[[Mesh], None]:
    def change(mesh: Mesh) -> None:
        for one in changes:
            one(mesh)
    return change


def _v2_endpoint(present: bool, held: list[dict[str, Any]]) -> Callable[[Mesh], None]:
    def change(mesh: Mesh) -> None:
        endpoints = _service(mesh, "reviews")["endpoints"]
        if not present:
            held[:] = [e for e in endpoints if e.get("labels", {}).get("version") == "v2"]
            endpoints[:] = [e for e in endpoints if e not in held]
        else:
            endpoints.extend(e for e in held if e not in endpoints)
    return change


def scenarios() -> dict[str, Scenario]:
    held: list[dict[str, Any]] = []
    return {
        "canary": Scenario("reviews v2 as a canary: 90/10, then 50/50, then 0/100", (
            Step(3, "split reviews v1/v2 90/10", _split(90, 10)),
            Step(6, "split reviews v1/v2 50/50", _split(50, 50)),
            Step(6, "split reviews v1/v2 0/100: v2 takes all", _split(0, 100)),
        )),
        "fault": Scenario("ratings aborts half its requests with 503, then recovers", (
            Step(3, "inject a 503 into 50% of ratings' requests",
                 _set("ratings", "fault", {"abort": {"percent": 50, "status": 503}})),
            Step(8, "remove the fault from ratings", _set("ratings", "fault", None)),
        )),
        "circuit-breaker": Scenario(
            "ratings slows to 50 ms, reviews takes 1 request at a time, traffic bursts to "
            "100/s: the breaker sheds the excess with 503s", (
                Step(3, "slow ratings by 50 ms, limit reviews to 1 request and 1 pending, "
                     "burst traffic to 100/s", _both(
                         _set("ratings", "fault",
                              {"delay": {"percent": 100, "duration": "50ms"}}),
                         _set("reviews", "circuit_breaker",
                              {"max_requests": 1, "max_pending_requests": 1})), rate=100),
                Step(8, "lift the limit and the delay, traffic back to 20/s", _both(
                    _set("ratings", "fault", None),
                    _set("reviews", "circuit_breaker", None)), rate=20),
            )),
        "endpoint-gone": Scenario("reviews v2's endpoint goes away, then comes back", (
            Step(3, "remove reviews v2's endpoint", _v2_endpoint(False, held)),
            Step(8, "bring reviews v2's endpoint back", _v2_endpoint(True, held)),
        )),
    }
