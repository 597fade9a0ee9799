"""Status errors as the real API server sends them: metav1.Status objects and the
field errors of a 422, with the real messages.

Part of the API server double (tests/kube/apiserver.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from controlplane.sources.kubernetes.kinds import (
    Kind,
)
from tests.kube.constants import (
    Obj,
)

# --- Status errors ----------------------------------------------------------------------
# Every failure is a metav1.Status, as the real server sends it; from Python the same
# object is raised in a StatusError, so a test sees what the client would.


class StatusError(Exception):
    """A request the API server refuses; ``status`` is the Status object it returns."""

    def __init__(self, status: Obj, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status['code']} {status['reason']}: {status['message']}")
        self.status = status
        self.headers = dict(headers or {})

    @property
    def code(self) -> int:
        return int(self.status["code"])

    @property
    def reason(self) -> str:
        return str(self.status["reason"])

    @property
    def message(self) -> str:
        return str(self.status["message"])


_REASONS: Final = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
    405: "MethodNotAllowed", 406: "NotAcceptable", 409: "Conflict", 410: "Expired",
    415: "UnsupportedMediaType", 422: "Invalid", 429: "TooManyRequests",
    500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout",
}


def status_object(code: int, message: str, reason: str | None = None,
                  details: Obj | None = None) -> Obj:
    status: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": message, "reason": reason or _REASONS.get(code, "Unknown")}
    if details is not None:
        status["details"] = details
    status["code"] = code
    return status


def _error(code: int, message: str, reason: str | None = None,
           details: Obj | None = None) -> StatusError:
    return StatusError(status_object(code, message, reason, details))


def _resource(kind: Kind) -> str:
    """The resource as messages name it: ``services``, ``endpointslices.discovery.k8s.io``."""
    return f"{kind.plural}.{kind.group}" if kind.group else kind.plural


def _details(kind: Kind, name: str) -> Obj:
    details: Obj = {"name": name}
    if kind.group:
        details["group"] = kind.group
    details["kind"] = kind.plural
    return details


def _not_found(kind: Kind, name: str) -> StatusError:
    return _error(404, f'{_resource(kind)} "{name}" not found', details=_details(kind, name))


def _resource_not_found() -> StatusError:
    return _error(404, "the server could not find the requested resource", details={})


def _conflict(kind: Kind, name: str) -> StatusError:
    return _error(409, f'Operation cannot be fulfilled on {_resource(kind)} "{name}": the '
                  "object has been modified; please apply your changes to the latest version "
                  "and try again", details=_details(kind, name))


def _too_large(version: int, current: int) -> StatusError:
    """k8s.io/apiserver's NewTooLargeResourceVersionError: a Timeout, retry in a second."""
    return StatusError(status_object(
        504, f"Too large resource version: {version}, current: {current}", "Timeout",
        {"causes": [{"reason": "ResourceVersionTooLarge",
                     "message": "Too large resource version"}], "retryAfterSeconds": 1}),
        {"Retry-After": "1"})


def _too_old(version: int, oldest: int) -> StatusError:
    return _error(410, f"too old resource version: {version} ({oldest})", "Expired")


@dataclass(frozen=True)
class FieldError:
    """One entry of Go's field.ErrorList, formatted the same way."""

    path: str
    cause: str  # FieldValueInvalid, FieldValueRequired, ...
    body: str  # 'Invalid value: "127.0.0.1": may not be ...'

    def __str__(self) -> str:
        return f"{self.path}: {self.body}"


def _value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError(path, "FieldValueInvalid", f"Invalid value: {_value(value)}: {detail}")


def _required(path: str, detail: str = "") -> FieldError:
    return FieldError(path, "FieldValueRequired",
                      f"Required value: {detail}" if detail else "Required value")


def _not_supported(path: str, value: Any, supported: Iterable[Any]) -> FieldError:
    listed = ", ".join(_value(s) for s in supported)
    return FieldError(path, "FieldValueNotSupported",
                      f"Unsupported value: {_value(value)}: supported values: {listed}")


def _duplicate(path: str, value: Any) -> FieldError:
    return FieldError(path, "FieldValueDuplicate", f"Duplicate value: {_value(value)}")


def _invalid_object(kind: Kind, name: str, errors: list[FieldError]) -> StatusError:
    qualified = f"{kind.kind}.{kind.group}" if kind.group else kind.kind
    joined = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(map(str, errors)) + "]"
    details: Obj = {"name": name}
    if kind.group:
        details["group"] = kind.group
    details["kind"] = kind.kind
    details["causes"] = [{"reason": e.cause, "message": e.body, "field": e.path}
                         for e in errors]
    return _error(422, f'{qualified} "{name}" is invalid: {joined}', "Invalid", details)


