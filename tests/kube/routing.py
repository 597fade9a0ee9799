"""Requests as the audit log names them: which kind, namespace, object and verb a path
and method are, and the failures a test injects.

Part of the API server double (tests/kube/apiserver.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from controlplane.sources.kubernetes.kinds import (
    SERVICE_ACCOUNTS,
    TOKEN_SUBRESOURCE,
    Kind,
)
from tests.kube.constants import (
    _STATUS_SUBRESOURCE,
    _TRUE,
    SERVED,
)

# --- HTTP -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the API server's audit log would name it."""

    method: str
    path: str
    query: Mapping[str, str]
    verb: str  # list | watch | get | create | update | patch | delete | other
    kind: Kind | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    accept: str | None = None  # the Accept header: whole objects or metadata only


@dataclass(frozen=True)
class _Target:
    kind: Kind
    namespace: str | None
    name: str | None
    subresource: str | None


@dataclass
class _Failure:
    remaining: int
    status: int
    path: str | None


def _route(path: str) -> _Target | None:
    """/api/v1[/namespaces/NS]/PLURAL[/NAME[/status]] and the /apis/GROUP/VERSION ones."""
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        return None
    kind = next((k for k in SERVED if (k.group, k.version, k.plural) == (group, version,
                                                                          rest[0])), None)
    if kind is None:
        return None
    name = rest[1] if len(rest) >= 2 else None
    subresource = rest[2] if len(rest) == 3 else None
    if namespace is not None and not kind.namespaced:
        return None  # a cluster-scoped kind has no namespaced path
    if name is not None and namespace is None and kind.namespaced:
        return None  # namespaced objects are only addressable in their namespace
    if subresource is not None and not (
            (subresource == "status" and kind in _STATUS_SUBRESOURCE)
            or (subresource == TOKEN_SUBRESOURCE and kind == SERVICE_ACCOUNTS)):
        return None
    return _Target(kind, namespace, name, subresource)


def _verb(method: str, target: _Target | None, query: Mapping[str, str]) -> str:
    if target is None:
        return "other"
    if target.name is None:
        if method == "GET":
            return "watch" if query.get("watch", "") in _TRUE else "list"
        return {"POST": "create", "DELETE": "deletecollection"}.get(method, "other")
    if method == "POST" and target.subresource is not None:
        return "create"  # serviceaccounts/token
    return {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        method, "other")
