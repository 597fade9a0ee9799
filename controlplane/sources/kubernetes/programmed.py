"""A policy's ``Programmed`` condition: do the proxies take what it shaped?

The server's stream observer (controlplane/observe/rejections.py) knows which proxies
NACK resources of which Service, and which TrafficPolicy and SecurityPolicy shaped that
Service (``origins``, from the conversion). Only a replica whose proxies NACK can know:

- this replica sees proxies reject it: ``False``, reason ``Rejected``, ``rejected by N
  proxies (<types>): <Envoy's error> (seen by replica R)``;
- it sees none: ``True``, reason ``Programmed``, unless the condition says another
  replica saw a rejection of this very generation: that stays (its replica clears it,
  or an edit of the object does), so two replicas never undo each other's writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

from controlplane.mesh.model import Mesh
from controlplane.sources.kubernetes.kinds import POLICY_KIND, SECURITY_POLICY_KIND
from controlplane.sources.kubernetes.policies import Verdict
from controlplane.sources.kubernetes.services import Key
from controlplane.sources.kubernetes.status import (
    PROGRAMMED,
    PROGRAMMED_KINDS,
    Programmed,
    find,
)

PolicyKey = tuple[str, str, str]  # (kind, namespace, name)
ACCEPTED_BY_ALL: Final = "every proxy that uses it accepted it"


class RejectedLike(Protocol):
    """One object's rejections (observe/rejections.py's ``Rejected``)."""

    @property
    def proxies(self) -> int: ...
    @property
    def error(self) -> str: ...
    @property
    def types(self) -> Sequence[str]: ...


def _seen_by(replica: str) -> str:
    return f" (seen by replica {replica})"


def programmed(verdict: Verdict, current: Mapping[str, Any] | None,
               rejected: RejectedLike | None, replica: str) -> Programmed | None:
    """The ``Programmed`` condition this replica wants on the object (None: none, as on
    an object that is not accepted, or a Sidecar)."""
    if not verdict.accepted or verdict.kind not in PROGRAMMED_KINDS:
        return None
    if rejected is not None:
        count = rejected.proxies
        return Programmed("False", "Rejected", (
            f"rejected by {count} prox{'y' if count == 1 else 'ies'} "
            f"({', '.join(rejected.types)}): {rejected.error}{_seen_by(replica)}; the "
            "proxies keep what they had before: fix the object (see the server's "
            "/debug/rejections and `controlplane status`)"))
    there = find(current, PROGRAMMED)
    message = str(there.get("message", ""))
    if (there.get("status") == "False" and there.get("reason") == "Rejected"
            and _seen_by(replica) not in message
            and there.get("observedGeneration") == verdict.generation):
        return Programmed("False", "Rejected", message)  # another replica's finding
    return Programmed("True", "Programmed", ACCEPTED_BY_ALL)


def origins(mesh: Mesh, traffic: Mapping[Key, Key], verdicts: Mapping[Key, Verdict],
            security: Mapping[Key, Key]) -> dict[str, tuple[PolicyKey, ...]]:
    """Per served Service (``namespace/name``), the objects that shaped it: its accepted
    TrafficPolicy (``traffic``: Service -> policy) and the SecurityPolicy that targets it
    (``security``: policy -> (namespace, service); namespace- and mesh-wide ones, service
    "", shape every service and are not named)."""
    found: dict[str, list[PolicyKey]] = {}
    served = {(s.namespace, s.name) for s in mesh.services}
    for service, policy in traffic.items():
        verdict = verdicts.get(policy)
        if service in served and verdict is not None and verdict.accepted:
            found.setdefault(f"{service[0]}/{service[1]}", []).append((POLICY_KIND, *policy))
    for policy, (namespace, name) in security.items():
        if name and (namespace, name) in served:
            found.setdefault(f"{namespace}/{name}", []).append((SECURITY_POLICY_KIND, *policy))
    return {service: tuple(keys) for service, keys in found.items()}
