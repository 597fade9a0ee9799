"""A Kubernetes API server double that speaks the real list/watch wire protocol.

Why: no cluster is reachable in CI, and a mock of the client would test nothing. This is
an HTTP server on 127.0.0.1 that the *official* ``kubernetes`` client talks to unchanged
(``kubeconfig()`` writes the file it loads), so the code under test is the code that
runs against a real cluster. It serves the kinds in ``kinds.WATCHED`` and behaves like
kube-apiserver where the source can tell the difference:

- one global resourceVersion counter (etcd's revision), as a string on every object
  and list; uid, creationTimestamp, generation (bumped by spec changes), defaults
  (a Service's clusterIP, port protocols, targetPort; a Pod's scheme defaults and its
  ``Pending`` status with a qosClass on create), validation errors as 422 Status
  objects with the real messages (loopback EndpointSlice addresses; a Pod's containers,
  their names and images, and its spec being immutable but for images; the TrafficPolicy
  CRD's structural schema, which also prunes unknown fields with a ``Warning`` header);
- LIST with labelSelector, fieldSelector (metadata.name/namespace), limit/continue
  (every page is a consistent snapshot at the first page's resourceVersion);
  built-in list items carry no kind/apiVersion, custom-resource items do;
- WATCH: a chunked 200 with one JSON event per line, replayed from a bounded history
  after ``resourceVersion`` (or the current state as ADDED events when it is unset or
  "0"), label-selector transitions as ADDED/DELETED, BOOKMARKs, ``timeoutSeconds``,
  and ``410 Expired`` as an ERROR event in a 200 stream when the version is older than
  the history (``compact()``);
- the ``status`` subresource (Services, Pods, TrafficPolicies): updates of the main
  resource ignore status, updates of ``/status`` ignore everything else; no-op writes do
  not bump the resourceVersion or make an event;
- content negotiation by the Accept header (clauses by q, then in order): JSON objects,
  or, as client-go's metadata client asks (``as=PartialObjectMetadataList`` to LIST,
  ``as=PartialObjectMetadata`` to WATCH and GET; ``g=meta.k8s.io``, ``v=v1`` or
  ``v1beta1``), PartialObjectMetadata carrying each object's whole metadata: bookmarks
  too, ERROR events stay Status objects, an empty list has ``"items": null``. The real
  server's mismatches are kept: ``as=PartialObjectMetadata`` on a LIST is a 406 even with
  a fallback clause after it, ``as=PartialObjectMetadataList`` on a WATCH sends whole
  objects. Nothing acceptable is a ``406 NotAcceptable`` Status;
- PATCH as merge patch and JSON patch; strategic merge and server-side apply are refused
  with 415 rather than approximated.

Faults the real world has and tests need: ``drop_watches()`` (connections cut
mid-stream), ``pause()``/``resume()`` (silent connections), ``fail_next()`` (error
responses), ``restart()`` (the same port, optionally with the history gone), and
``requests`` (what the client asked for, Accept header included, to assert re-lists).

Authentication and RBAC as the control plane meets them: ``kubeconfig()`` gives the
server's service account, whose requests are authorized by the ClusterRole shipped in
deploy/kubernetes (``tests/kube/rbac.py``; 403 in the real format), bound cluster-wide or,
with ``rbac=Rbac(namespaces=[...])``, in some namespaces only; ``kubeconfig(admin=True)``
is a cluster admin (what tests write with); any other token is a 401.

Like a real server on the points the source relies on: a BOOKMARK about once a minute
(``bookmark_interval``, shorter in tests); ``restart()`` comes back with an empty watch
cache (every older resourceVersion is 410 Expired); a LIST at a resourceVersion newer
than the server has waits ``too_large_wait`` seconds, then answers 504 "Too large
resource version" with ``Retry-After`` (what a lagging replica, or one restored from an
etcd backup, answers; ``restore()`` makes one).

Not modelled: namespaces as objects (any namespace exists), finalizers, field managers,
HTTP/2; YAML, protobuf
and Table responses (where the real server would send one, a 406 says the double
cannot); for Pods, any scheduler or kubelet (a Pod stays Pending until ``update_status``),
admission plugins (service account volume, tolerations, priority) and graceful deletion
(a DELETE removes the Pod at once, as for one never scheduled).

It runs in its own thread with its own event loop, so synchronous code (the client)
and async tests can both use it; every method here is thread-safe.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import ipaddress
import json
import random
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from controlplane.sources.kubernetes.kinds import (
    ENDPOINT_SLICES,
    PODS,
    SERVICES,
    TRAFFIC_POLICIES,
    WATCHED,
    Kind,
)
from tests.kube.rbac import Rbac

Obj = dict[str, Any]

TOKEN: Final = "apiserver-double-token"  # the control plane's service account (RBAC applies)
ADMIN_TOKEN: Final = "apiserver-double-admin"  # a cluster admin: what tests write with
_BUILTIN: Final = frozenset({SERVICES, ENDPOINT_SLICES, PODS})  # list items: no kind/apiVersion
_STATUS_SUBRESOURCE: Final = frozenset({SERVICES, TRAFFIC_POLICIES, PODS})
_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})  # Go's strconv.ParseBool
_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})


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


# --- Selectors --------------------------------------------------------------------------

_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_VALUE = r"[-A-Za-z0-9_.]*"
_EXISTS = re.compile(rf"^(!?)\s*({_KEY})$")
_EQUALS = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*({_VALUE})$")
_SET = re.compile(rf"^({_KEY})\s+(in|notin)\s+\(\s*({_VALUE}(?:\s*,\s*{_VALUE})*)\s*\)$")


def _split_requirements(text: str) -> list[str]:
    """Commas separate requirements, except inside ``in (a,b)``."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return [p for p in parts if p]


class LabelSelector:
    """The labelSelector query parameter: =, ==, !=, in, notin, exists, !exists."""

    def __init__(self, text: str = "") -> None:
        self.text = text
        self._tests: list[Callable[[Mapping[str, str]], bool]] = []
        for requirement in _split_requirements(text):
            self._tests.append(self._parse(requirement))

    @staticmethod
    def _parse(requirement: str) -> Callable[[Mapping[str, str]], bool]:
        if m := _EQUALS.match(requirement):
            key, op, value = m.groups()
            if op == "!=":
                return lambda labels: labels.get(key) != value
            return lambda labels: labels.get(key) == value
        if m := _SET.match(requirement):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if op == "in":
                return lambda labels: labels.get(key) in values
            return lambda labels: labels.get(key) not in values
        if m := _EXISTS.match(requirement):
            negate, key = m.groups()
            return lambda labels: (key in labels) != bool(negate)
        raise _error(400, f"unable to parse requirement: {requirement!r}")

    def matches(self, obj: Obj) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(test(labels) for test in self._tests)


class FieldSelector:
    """The fieldSelector query parameter; like for custom resources, only metadata.name
    and metadata.namespace are supported."""

    _FIELDS: Final = ("metadata.name", "metadata.namespace")

    def __init__(self, text: str = "") -> None:
        self._terms: list[tuple[str, bool, str]] = []
        for term in _split_requirements(text):
            m = re.match(r"^([^=!]+?)\s*(==|=|!=)\s*(.*)$", term)
            if not m:
                raise _error(400, f"invalid selector: '{text}'; can't understand '{term}'")
            name, op, value = m.groups()
            if name not in self._FIELDS:
                raise _error(400, f'"{name}" is not a known field selector: only '
                             '"metadata.name", "metadata.namespace"')
            self._terms.append((name.split(".")[1], op != "!=", value))

    def matches(self, obj: Obj) -> bool:
        meta = obj.get("metadata", {})
        return all((meta.get(name) == value) == equal for name, equal, value in self._terms)


# --- Patches ----------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def _add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent, last = _walk(doc, parts[:-1]), parts[-1]
    if isinstance(parent, list):
        parent.insert(len(parent) if last == "-" else int(last), value)
    else:
        parent[last] = value
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    if not parts:
        raise ValueError("cannot remove the whole document")
    parent, last = _walk(doc, parts[:-1]), parts[-1]
    del parent[int(last) if isinstance(parent, list) else last]
    return doc


def json_patch(doc: Any, operations: list[Obj]) -> Any:
    """RFC 6902: add, remove, replace, move, copy, test."""
    doc = copy.deepcopy(doc)
    for op in operations:
        name, parts = op.get("op"), _pointer(op.get("path", ""))
        if name == "test":
            if _walk(doc, parts) != op.get("value"):
                raise ValueError(f"test failed at {op.get('path')!r}")
        elif name in ("move", "copy"):
            source = _pointer(op["from"])
            value = copy.deepcopy(_walk(doc, source))
            doc = _add(_remove(doc, source) if name == "move" else doc, parts, value)
        elif name == "add":
            doc = _add(doc, parts, copy.deepcopy(op["value"]))
        elif name == "replace":
            doc = _add(_remove(doc, parts) if parts else doc, parts, copy.deepcopy(op["value"]))
        elif name == "remove":
            doc = _remove(doc, parts)
        else:
            raise ValueError(f"unknown JSON patch operation {name!r}")
    return doc


# --- Defaulting and validation ----------------------------------------------------------
# What the real server fills in and refuses, for the kinds served here.

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_NAME_HELP: Final = {
    "1035": ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', "
             "start with an alphabetic character, and end with an alphanumeric character "
             "(e.g. 'my-name',  or 'abc-123', regex used for validation is "
             "'[a-z]([-a-z0-9]*[a-z0-9])?')"),
    "1123": ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
             "characters, '-' or '.', and must start and end with an alphanumeric character "
             "(e.g. 'example.com', regex used for validation is "
             "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"),
    "label": ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters "
              "or '-', and must start and end with an alphanumeric character (e.g. 'my-name', "
              " or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"),
}


def _validate_name(kind: Kind, name: str) -> list[FieldError]:
    if not name:
        return [_required("metadata.name", "name or generateName is required")]
    if kind == SERVICES:
        if not _DNS1035_LABEL.match(name) or len(name) > 63:
            return [_invalid("metadata.name", name, _NAME_HELP["1035"])]
    elif not _DNS1123_SUBDOMAIN.match(name) or len(name) > 253:
        return [_invalid("metadata.name", name, _NAME_HELP["1123"])]
    return []


class _ServiceIPs:
    """ClusterIP allocation from 10.96.0.0/12, as a default cluster does."""

    def __init__(self) -> None:
        self._next = int(ipaddress.IPv4Address("10.96.0.10"))

    def allocate(self) -> str:
        address = str(ipaddress.IPv4Address(self._next))
        self._next += 1
        return address


def _default_service(obj: Obj, old: Obj | None, ips: _ServiceIPs) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    for port in spec.get("ports") or []:
        port.setdefault("protocol", "TCP")
        if "port" in port:
            port.setdefault("targetPort", port["port"])
    if spec["type"] != "ExternalName":
        if not spec.get("clusterIP") and old is not None:
            spec["clusterIP"] = old.get("spec", {}).get("clusterIP")  # immutable once set
        if not spec.get("clusterIP"):
            spec["clusterIP"] = ips.allocate()
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
        if spec["clusterIP"] != "None":
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")


def _validate_service(obj: Obj) -> list[FieldError]:
    errors: list[FieldError] = []
    ports = obj.get("spec", {}).get("ports") or []
    if not ports and obj["spec"].get("type") != "ExternalName":
        errors.append(_required("spec.ports"))
    names: set[str] = set()
    for i, port in enumerate(ports):
        path, name = f"spec.ports[{i}]", port.get("name", "")
        if len(ports) > 1 and not name:
            errors.append(_required(f"{path}.name"))
        elif name and not _DNS1123_LABEL.match(name):
            errors.append(_invalid(f"{path}.name", name, _NAME_HELP["label"]))
        elif name in names:
            errors.append(_duplicate(f"{path}.name", name))
        names.add(name)
        number = port.get("port")
        if not isinstance(number, int) or not 1 <= number <= 65535:
            errors.append(_invalid(f"{path}.port", number, "must be between 1 and 65535, "
                                   "inclusive"))
        if port.get("protocol") not in ("TCP", "UDP", "SCTP"):
            errors.append(_not_supported(f"{path}.protocol", port.get("protocol"),
                                         ("SCTP", "TCP", "UDP")))
    return errors


def _default_endpoint_slice(obj: Obj) -> None:
    for port in obj.get("ports") or []:
        port.setdefault("name", "")
        port.setdefault("protocol", "TCP")


def _non_special_ip(path: str, address: str) -> list[FieldError]:
    """ValidateNonSpecialIP in k8s.io/kubernetes/pkg/apis/core/validation, word for word."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return [_invalid(path, address, "must be a valid IP address")]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # Go treats ::ffff:a.b.c.d as the IPv4 address
    errors = []
    if ip.is_unspecified:
        errors.append(_invalid(path, address, f"may not be unspecified ({address})"))
    if ip.is_loopback:
        errors.append(_invalid(path, address,
                               "may not be in the loopback range (127.0.0.0/8, ::1/128)"))
    if ip.is_link_local and not ip.is_multicast:
        errors.append(_invalid(path, address,
                               "may not be in the link-local range (169.254.0.0/16, fe80::/10)"))
    link_local_multicast = (ip in ipaddress.ip_network("224.0.0.0/24")
                            if ip.version == 4 else ip in ipaddress.ip_network("ff02::/16"))
    if link_local_multicast:
        errors.append(_invalid(path, address, "may not be in the link-local multicast range "
                               "(224.0.0.0/24, ff02::/10)"))
    return errors


def _validate_endpoint_slice(obj: Obj) -> list[FieldError]:
    """ValidateEndpointSlice in k8s.io/kubernetes/pkg/apis/discovery/validation."""
    errors: list[FieldError] = []
    address_type = obj.get("addressType", "")
    if not address_type:
        errors.append(_required("addressType"))
    elif address_type not in ("FQDN", "IPv4", "IPv6"):
        errors.append(_not_supported("addressType", address_type, ("FQDN", "IPv4", "IPv6")))
    for i, endpoint in enumerate(obj.get("endpoints") or []):
        addresses = endpoint.get("addresses") or []
        if not addresses:
            errors.append(_required(f"endpoints[{i}].addresses", "must contain at least 1 "
                                    "address"))
        for j, address in enumerate(addresses):
            path = f"endpoints[{i}].addresses[{j}]"
            if address_type in ("IPv4", "IPv6"):
                family = 4 if address_type == "IPv4" else 6
                try:
                    right_family = ipaddress.ip_address(address).version == family
                except ValueError:
                    right_family = False
                if not right_family:
                    errors.append(_invalid(path, address, f"must be a valid {address_type} "
                                           "address"))
                errors.extend(_non_special_ip(path, address))
    names: set[str] = set()
    for i, port in enumerate(obj.get("ports") or []):
        name = port.get("name") or ""
        if name and not _DNS1123_LABEL.match(name):
            errors.append(_invalid(f"ports[{i}].name", name, _NAME_HELP["label"]))
        if name in names:
            errors.append(_duplicate(f"ports[{i}].name", name))
        names.add(name)
        if port.get("protocol") not in ("SCTP", "TCP", "UDP"):
            errors.append(_not_supported(f"ports[{i}].protocol", port.get("protocol"),
                                         ("SCTP", "TCP", "UDP")))
    return errors


_POD_UPDATABLE: Final = (
    "pod updates may not change fields other than `spec.containers[*].image`,"
    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only "
    "additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be "
    "set to 1 if it was previously negative)")


def _pull_policy(image: str) -> str:
    """SetDefaults_Container: Always for ``:latest`` or no tag, unless a digest pins it."""
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    return "Always" if ":" not in last or last.endswith(":latest") else "IfNotPresent"


def _default_pod(obj: Obj) -> None:
    """The scheme's defaults; what admission plugins add (the service account's token
    volume, tolerations, priority) is not modelled."""
    spec = obj.setdefault("spec", {})
    for key, value in (("restartPolicy", "Always"), ("dnsPolicy", "ClusterFirst"),
                       ("terminationGracePeriodSeconds", 30), ("securityContext", {}),
                       ("schedulerName", "default-scheduler"), ("enableServiceLinks", True)):
        spec.setdefault(key, copy.deepcopy(value))
    for container in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        if isinstance(container.get("image"), str) and container["image"]:
            container.setdefault("imagePullPolicy", _pull_policy(container["image"]))
        resources = container.setdefault("resources", {})
        for name, quantity in (resources.get("limits") or {}).items():
            resources.setdefault("requests", {}).setdefault(name, quantity)
        for port in container.get("ports") or []:
            port.setdefault("protocol", "TCP")


def _qos_class(spec: Obj) -> str:
    """GetPodQOS, with quantities compared as written ("1" is not "1000m" here)."""
    resources = [c.get("resources") or {} for c in
                 (spec.get("initContainers") or []) + (spec.get("containers") or [])]
    compute = ("cpu", "memory")
    if not any((r.get(part) or {}).get(name) for r in resources
               for part in ("requests", "limits") for name in compute):
        return "BestEffort"
    guaranteed = all(name in (r.get("limits") or {})
                     and (r.get("requests") or {}).get(name) == r["limits"][name]
                     for r in resources for name in compute)
    return "Guaranteed" if guaranteed else "Burstable"


def _sync_pod_ips(status: Obj) -> None:
    """v1 has podIP and podIPs, the internal type only podIPs; conversion keeps them in
    step, podIP winning when they disagree (for older clients)."""
    ip, ips = status.get("podIP"), status.get("podIPs") or []
    if ip and (not ips or ips[0].get("ip") != ip):
        ips = [{"ip": ip}]
    status.pop("podIP", None)
    status.pop("podIPs", None)
    if ips:
        status["podIP"], status["podIPs"] = ips[0].get("ip"), ips


def _label_errors(path: str, name: str) -> list[FieldError]:
    """ValidateDNS1123Label: one error per broken rule."""
    errors = []
    if len(name) > 63:
        errors.append(_invalid(path, name, "must be no more than 63 characters"))
    if not _DNS1123_LABEL.match(name):
        errors.append(_invalid(path, name, _NAME_HELP["label"]))
    return errors


def _validate_containers(containers: Any, path: str) -> list[FieldError]:
    if not containers:
        return [_required(path)]
    errors: list[FieldError] = []
    names: set[str] = set()
    for i, container in enumerate(containers):
        at, name = f"{path}[{i}]", container.get("name") or ""
        if not name:
            errors.append(_required(f"{at}.name"))
        elif name in names:
            errors.append(_duplicate(f"{at}.name", name))
        else:
            errors.extend(_label_errors(f"{at}.name", name))
        names.add(name)
        if not container.get("image"):
            errors.append(_required(f"{at}.image"))
    return errors


def _immutable_pod_spec(spec: Obj) -> Obj:
    """The spec less what a pod update may change. Simplified: tolerations and
    activeDeadlineSeconds may change freely here, not only as the real rules allow."""
    masked = copy.deepcopy(spec)
    for key in ("containers", "initContainers"):
        for container in masked.get(key) or []:
            container.pop("image", None)
    masked.pop("tolerations", None)
    masked.pop("activeDeadlineSeconds", None)
    return masked


def _validate_pod(obj: Obj, old: Obj | None) -> list[FieldError]:
    """What ValidatePodCreate/Update and ValidatePodStatusUpdate refuse first: no
    containers, nameless or imageless ones, spec changes beyond the few allowed, bad IPs."""
    spec = obj.get("spec") or {}
    errors = _validate_containers(spec.get("containers"), "spec.containers")
    if old is not None and _immutable_pod_spec(spec) != _immutable_pod_spec(old["spec"]):
        # The real message goes on with a diff of the two specs, left out here.
        errors.append(FieldError("spec", "FieldValueForbidden", f"Forbidden: {_POD_UPDATABLE}"))
    for i, entry in enumerate((obj.get("status") or {}).get("podIPs") or []):
        try:
            ipaddress.ip_address(entry.get("ip", ""))
        except ValueError:
            errors.append(_invalid(f"status.podIPs[{i}]", entry.get("ip", ""),
                                   "must be a valid IP address, (e.g. 10.9.8.7 or "
                                   "2001:db8::ffff)"))
    return errors


def traffic_policy_schema() -> Obj:
    """The openAPIV3Schema of the CRD the project ships (generated from the model)."""
    from controlplane.sources.kubernetes.crd import traffic_policy_crd

    return dict(traffic_policy_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


_JSON_TYPES: Final = {"object": dict, "array": list, "string": str, "boolean": bool}


def _type_ok(value: Any, wanted: str) -> bool:
    if wanted == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if wanted == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _JSON_TYPES.get(wanted, object))


def _prune(value: Any, schema: Obj, path: str, pruned: list[str]) -> Any:
    """Drop fields the schema does not declare, as the API server does for CRDs."""
    if isinstance(value, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return value
        if "additionalProperties" in schema:
            return {k: _prune(v, schema["additionalProperties"], f"{path}.{k}", pruned)
                    for k, v in value.items()}
        props = schema.get("properties", {})
        kept = {}
        for key, sub in value.items():
            if key in props:
                kept[key] = _prune(sub, props[key], f"{path}.{key}", pruned)
            else:
                pruned.append(f"{path}.{key}".lstrip("."))
        return kept
    if isinstance(value, list) and "items" in schema:
        return [_prune(v, schema["items"], f"{path}[{i}]", pruned) for i, v in enumerate(value)]
    return value


def _validate_schema(value: Any, schema: Obj, path: str) -> list[FieldError]:
    """The structural-schema checks kube-openapi makes, with its messages."""
    errors: list[FieldError] = []
    wanted = schema.get("type")
    if wanted and not _type_ok(value, wanted):
        actual = next((name for name in ("boolean", "integer", "number", "string", "object",
                                         "array") if _type_ok(value, name)), "null")
        return [_invalid(path, value, f'{path} in body must be of type {wanted}: "{actual}"')]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(_not_supported(path, value, schema["enum"]))
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(_invalid(path, value, f"{path} in body should match "
                                   f"'{schema['pattern']}'"))
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(_invalid(path, value, f"{path} in body should be at least "
                                   f"{schema['minLength']} chars long"))
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(FieldError(path, "FieldValueTooLong",
                                     f"Too long: may not be more than {schema['maxLength']} "
                                     "bytes"))
    if _type_ok(value, "number"):
        for bound, exclusive, word in (("minimum", "exclusiveMinimum", "greater"),
                                       ("maximum", "exclusiveMaximum", "less")):
            if bound not in schema:
                continue
            limit, strict = schema[bound], bool(schema.get(exclusive))
            broken = (value <= limit if strict else value < limit) if word == "greater" else (
                value >= limit if strict else value > limit)
            if broken:
                relation = f"{word} than" if strict else f"{word} than or equal to"
                errors.append(_invalid(path, value, f"{path} in body should be {relation} "
                                       f"{limit}"))
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(_invalid(path, len(value), f"{path} in body should have at least "
                                   f"{schema['minItems']} items"))
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(FieldError(path, "FieldValueTooMany", f"Too many: {len(value)}: "
                                     f"must have at most {schema['maxItems']} items"))
        for i, item in enumerate(value):
            errors.extend(_validate_schema(item, schema.get("items", {}), f"{path}[{i}]"))
    if isinstance(value, dict):
        if "minProperties" in schema and len(value) < schema["minProperties"]:
            errors.append(_invalid(path, len(value), f"{path} in body should have at least "
                                   f"{schema['minProperties']} properties"))
        for key in schema.get("required", []):
            if key not in value:
                errors.append(_required(f"{path}.{key}".lstrip(".")))
        props = schema.get("properties", {})
        for key, sub in value.items():
            sub_schema = props.get(key, schema.get("additionalProperties"))
            if isinstance(sub_schema, dict) and key != "metadata":
                errors.extend(_validate_schema(sub, sub_schema, f"{path}.{key}".lstrip(".")))
    return errors


# --- Content negotiation: whole objects or metadata only --------------------------------
# The server answers in the first Accept clause (by q, then the client's order) that it can
# serve; a clause may ask for a meta.k8s.io kind instead of the object (``as=``), which is
# how client-go's metadata client gets PartialObjectMetadata(List).

_META_GROUP: Final = "meta.k8s.io"
_META_VERSIONS: Final = ("v1", "v1beta1")
_JSON: Final = "application/json"
_YAML: Final = "application/yaml"
_PROTOBUF: Final = "application/vnd.kubernetes.protobuf"
_MEDIA_TYPES: Final = (_JSON, _YAML, _PROTOBUF)  # kube-apiserver's, in its order (no CBOR)
_STREAMED: Final = (_JSON, _PROTOBUF)  # those with a watch framing; YAML has none
_CUSTOM_MEDIA_TYPES: Final = (_JSON, _YAML)  # custom resources, when not converted


@dataclass(frozen=True)
class _Clause:
    """One media range of an Accept header, as goautoneg parses it."""

    type: str
    subtype: str
    params: Mapping[str, str]
    q: float

    def specificity(self, media_type: str) -> int:
        """2 for an exact match, 1 for type/*, 0 for */*, -1 for none (q aside)."""
        type_, _, subtype = media_type.partition("/")
        if (self.type, self.subtype) == (type_, subtype):
            return 2
        if self.type == type_ and self.subtype == "*":
            return 1
        return 0 if (self.type, self.subtype) == ("*", "*") else -1


def _parse_accept(header: str) -> list[_Clause]:
    """The clauses, highest q first, concrete types before wildcards, else in order."""
    clauses = []
    for part in header.split(","):
        media_range, *params = part.split(";")
        type_, _, subtype = (p.strip() for p in media_range.partition("/"))
        if not subtype:
            if type_ != "*":
                continue  # goautoneg skips what is not a media range
            subtype = "*"
        q, options = 1.0, {}
        for param in params:
            key, equals, value = (p.strip() for p in param.partition("="))
            if not equals:
                continue
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0  # Go's ParseFloat error leaves zero
            else:
                options[key] = value
        clauses.append(_Clause(type_, subtype, options, q))
    return sorted(clauses, key=lambda c: (-c.q, c.type == "*", c.subtype == "*"))


@dataclass(frozen=True)
class _Output:
    """What responses carry: the objects themselves (``convert`` None), or a meta.k8s.io
    kind made from them, in ``version``."""

    convert: str | None = None  # PartialObjectMetadata | PartialObjectMetadataList | Table
    version: str = "v1"

    @property
    def api_version(self) -> str:
        return f"{_META_GROUP}/{self.version}"


def _conversion(clause: _Clause, media_type: str, kind: Kind) -> _Output | None:
    """acceptMediaTypeOptions with the endpoint's restrictions: what this clause asks of
    this media type, or None when the server skips the pair."""
    params = clause.params
    stream = params.get("stream")
    if stream and (stream != "watch" or media_type not in _STREAMED):
        return None
    if params.get("sv") and params["sv"] != "v1":
        return None
    if not {"as", "g", "v"} & params.keys():
        if kind not in _BUILTIN and media_type not in _CUSTOM_MEDIA_TYPES:
            return None
        return _Output()
    target, group, version = params.get("as", ""), params.get("g", ""), params.get("v", "")
    if group != _META_GROUP or version not in _META_VERSIONS:
        return None
    if target == "Table" and media_type in (_JSON, _YAML):
        return _Output(target, version)
    if target in ("PartialObjectMetadata", "PartialObjectMetadataList"):
        return _Output(target, version)  # list or not is only checked later, as there
    return None


def _not_acceptable(accepted: Iterable[str], note: str = "") -> StatusError:
    return _error(406, "only the following media types are accepted: "
                  + ", ".join(accepted) + note)


def _rejected(media_type: str, clauses: list[_Clause]) -> bool:
    """q=0 on the most specific clause naming a media type refuses it, even where a
    wildcard would accept it."""
    best = max(clauses, key=lambda c: c.specificity(media_type), default=None)
    return best is not None and best.specificity(media_type) >= 0 and best.q <= 0


def _negotiate(header: str, kind: Kind, watch: bool) -> _Output:
    """NegotiateOutputMediaType. Where the real server would answer in YAML, protobuf or
    as a Table, the double cannot, and says so with a 406 rather than send JSON."""
    if not header:
        return _Output()
    clauses = _parse_accept(header)
    for clause in (c for c in clauses if c.q > 0):
        for media_type in _MEDIA_TYPES:
            if clause.specificity(media_type) < 0 or _rejected(media_type, clauses):
                continue
            output = _conversion(clause, media_type, kind)
            if output is None:
                continue
            if watch and media_type not in _STREAMED:
                raise _not_acceptable(f"{m};stream=watch" for m in _STREAMED)
            if media_type != _JSON or output.convert == "Table":
                unserved = "as=Table" if output.convert == "Table" else media_type
                raise _not_acceptable(_MEDIA_TYPES, " (the API server double writes only "
                                      f"application/json, not {unserved})")
            if watch and output.convert == "PartialObjectMetadataList":
                # Converting each event fails, and the real server then sends the object.
                return _Output()
            return output
    raise _not_acceptable(_MEDIA_TYPES)


def _go_type(kind: Kind, is_list: bool) -> str:
    """The %T in the real server's messages: its internal type, or unstructured."""
    name = (f"{kind.group.split('.')[0] or 'core'}.{kind.kind}" if kind in _BUILTIN
            else "unstructured.Unstructured")
    return f"*{name}List" if is_list else f"*{name}"


def _partial(obj: Obj, output: _Output) -> Obj:
    return {"kind": "PartialObjectMetadata", "apiVersion": output.api_version,
            "metadata": copy.deepcopy(obj.get("metadata", {}))}


def _represent(kind: Kind, obj: Obj, output: _Output) -> Obj:
    """One object (or event object) as negotiated; a Status is always sent as it is."""
    if output.convert is None or obj.get("kind") == "Status":
        return obj
    if output.convert == "PartialObjectMetadataList":
        raise _error(406, "you requested PartialObjectMetadataList, but the requested object "
                     f"is not a list ({_go_type(kind, False)})")
    return _partial(obj, output)


def _represent_list(kind: Kind, body: Obj, output: _Output) -> Obj:
    """A list as negotiated. An empty PartialObjectMetadataList has ``"items": null``:
    Go's nil slice, which the real server sends as it is."""
    if output.convert is None:
        return body
    if output.convert == "PartialObjectMetadata":
        raise _error(406, "you requested PartialObjectMetadata, but the requested object is "
                     f"a list ({_go_type(kind, True)})")
    items = [_partial(item, output) for item in body["items"]]
    return {"kind": "PartialObjectMetadataList", "apiVersion": output.api_version,
            "metadata": body["metadata"], "items": items or None}


# --- The store: objects, resourceVersions, history, watchers ----------------------------


@dataclass(frozen=True)
class _Change:
    """One write, as the watch history keeps it (etcd's event plus the previous value)."""

    version: int
    type: str  # ADDED | MODIFIED | DELETED
    kind: Kind
    obj: Obj  # after the write; for DELETED the last state, at the deletion's version
    prev: Obj | None


@dataclass(eq=False)
class _Watcher:
    """One open watch: its filters, and the events waiting to be written to it."""

    kind: Kind
    namespace: str | None
    labels: LabelSelector
    fields: FieldSelector
    bookmarks: bool
    loop: asyncio.AbstractEventLoop
    wakeup: asyncio.Event
    output: _Output = _Output()  # how its event objects are written
    pending: deque[tuple[str, Obj]] = field(default_factory=deque)  # guarded by the store lock
    bookmark_requested: bool = False
    dropped: bool = False

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and obj["metadata"].get("namespace") != self.namespace:
            return False
        return self.labels.matches(obj) and self.fields.matches(obj)

    def translate(self, change: _Change) -> tuple[str, Obj] | None:
        """The event this watcher sees: a selector the object leaves is a DELETED (with
        the previous content), one it enters an ADDED, as the API server's cacher does."""
        if change.kind != self.kind:
            return None
        now, before = self.matches(change.obj), self.matches(change.prev)
        if change.type != "MODIFIED":
            return (change.type, change.obj) if now else None
        if now and before:
            return "MODIFIED", change.obj
        if now:
            return "ADDED", change.obj
        if before:
            assert change.prev is not None
            prev = copy.deepcopy(change.prev)
            prev["metadata"]["resourceVersion"] = str(change.version)
            return "DELETED", prev
        return None

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped
            self.loop.call_soon_threadsafe(self.wakeup.set)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _key(obj: Obj) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta.get("name", "")


def _kind_of(obj: Obj) -> Kind:
    for kind in WATCHED:
        if obj.get("apiVersion") == kind.api_version and obj.get("kind") == kind.kind:
            return kind
    raise ValueError(f"not a served kind: apiVersion={obj.get('apiVersion')!r} "
                     f"kind={obj.get('kind')!r}")


def _kind_named(name: Kind | str) -> Kind:
    if isinstance(name, Kind):
        return name
    for kind in WATCHED:
        if name in (kind.plural, kind.kind, kind.kind.lower()):
            return kind
    raise ValueError(f"not a served kind: {name!r}")


def _spec_of(kind: Kind, obj: Obj) -> Any:
    """What a generation counts: for CRDs all but metadata and status."""
    if kind == ENDPOINT_SLICES:
        return [obj.get("addressType"), obj.get("endpoints"), obj.get("ports")]
    if kind == PODS:
        return obj.get("spec")
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


class _Store:
    """The objects and their history; every method holds one lock, so Python callers and
    HTTP handlers see one order of writes."""

    def __init__(self, history_limit: int, crd_schema: Obj | None) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.version = 1  # etcd starts above 0; "0" means "any" to the API
        self.compacted = 1  # watches from an older version get 410
        self.objects: dict[Kind, dict[tuple[str, str], Obj]] = {k: {} for k in WATCHED}
        self.history: deque[_Change] = deque()
        self.history_limit = history_limit
        self.watchers: set[_Watcher] = set()
        self.paused = False
        self.closing = False  # a graceful shutdown: every watch ends, new ones at once
        self.crd_schema = crd_schema
        self._ips = _ServiceIPs()

    # -- reads

    def get(self, kind: Kind, namespace: str, name: str) -> Obj:
        with self.lock:
            obj = self.objects[kind].get((namespace, name))
            if obj is None:
                raise _not_found(kind, name)
            return copy.deepcopy(obj)

    def state_at(self, kind: Kind, version: int) -> dict[tuple[str, str], Obj]:
        """The objects as they were at ``version``, by undoing the history after it."""
        with self.lock:
            if version < self.compacted:
                raise _too_old(version, self.compacted)
            state = dict(self.objects[kind])
            for change in reversed(self.history):
                if change.version <= version:
                    break
                if change.kind != kind:
                    continue
                key = _key(change.obj)
                if change.prev is None:
                    state.pop(key, None)
                else:
                    state[key] = change.prev
            return state

    # -- writes

    def create(self, obj: Obj, namespace: str | None = None) -> tuple[Obj, list[str]]:
        """Store a new object; returns it and the warnings (pruned fields)."""
        kind = _kind_of(obj)
        with self.lock:
            new = copy.deepcopy(obj)
            meta = new.setdefault("metadata", {})
            meta["namespace"] = namespace or meta.get("namespace") or "default"
            if meta.get("resourceVersion"):
                raise _error(500, "resourceVersion should not be set on objects to be created")
            if not meta.get("name") and meta.get("generateName"):
                alphabet = "bcdfghjklmnpqrstvwxz2456789"  # as names.SimpleNameGenerator
                meta["name"] = meta["generateName"] + "".join(random.choices(alphabet, k=5))
            key = _key(new)
            if key in self.objects[kind]:
                raise _error(409, f'{_resource(kind)} "{key[1]}" already exists',
                             "AlreadyExists", _details(kind, key[1]))
            for system in ("uid", "creationTimestamp", "generation", "deletionTimestamp"):
                meta.pop(system, None)
            if kind in _STATUS_SUBRESOURCE:
                new.pop("status", None)  # set only through /status
            warnings = self._admit(kind, new, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            if kind != SERVICES:
                meta["generation"] = 1
            self._commit(kind, "ADDED", new, None)
            return copy.deepcopy(new), warnings

    def update(self, obj: Obj, subresource: str | None = None,
               unconditional: bool = False) -> tuple[Obj, list[str]]:
        """Replace an object (or its status); returns it and the warnings."""
        kind = _kind_of(obj)
        with self.lock:
            new = copy.deepcopy(obj)
            meta = new.setdefault("metadata", {})
            meta.setdefault("namespace", "default")
            key = _key(new)
            old = self.objects[kind].get(key)
            if old is None:
                raise _not_found(kind, key[1])
            wanted = meta.get("resourceVersion")
            if wanted and not unconditional and wanted != old["metadata"]["resourceVersion"]:
                raise _conflict(kind, key[1])
            if subresource == "status":
                status = new.get("status")
                new = copy.deepcopy(old)
                new.pop("status", None)
                if status is not None:
                    new["status"] = status
            elif kind in _STATUS_SUBRESOURCE:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
            for system in ("uid", "creationTimestamp", "generation", "resourceVersion"):
                if system in old["metadata"]:
                    new["metadata"][system] = old["metadata"][system]
            warnings = self._admit(kind, new, old)
            if "generation" in old["metadata"] and _spec_of(kind, new) != _spec_of(kind, old):
                new["metadata"]["generation"] = old["metadata"]["generation"] + 1
            if new == old:
                return copy.deepcopy(old), warnings  # a no-op: no new version, no event
            self._commit(kind, "MODIFIED", new, old)
            return copy.deepcopy(new), warnings

    def delete(self, kind: Kind, namespace: str, name: str) -> Obj:
        with self.lock:
            old = self.objects[kind].get((namespace, name))
            if old is None:
                raise _not_found(kind, name)
            gone = copy.deepcopy(old)
            self._commit(kind, "DELETED", gone, old)
            return copy.deepcopy(gone)

    def _admit(self, kind: Kind, obj: Obj, old: Obj | None) -> list[str]:
        """Default, prune and validate as the real server would; returns warnings."""
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        warnings: list[str] = []
        errors = _validate_name(kind, obj["metadata"].get("name", ""))
        if kind == SERVICES:
            _default_service(obj, old, self._ips)
            obj.setdefault("status", {"loadBalancer": {}})
            errors += _validate_service(obj)
        elif kind == ENDPOINT_SLICES:
            _default_endpoint_slice(obj)
            errors += _validate_endpoint_slice(obj)
            if old is not None and old.get("addressType") != obj.get("addressType"):
                errors.append(_invalid("addressType", obj.get("addressType"),
                                       "field is immutable"))
        elif kind == PODS:
            _default_pod(obj)
            if old is None:  # PrepareForCreate: whatever status was sent, this is it
                obj["status"] = {"phase": "Pending", "qosClass": _qos_class(obj["spec"])}
            _sync_pod_ips(obj.setdefault("status", {}))
            errors += _validate_pod(obj, old)
        elif self.crd_schema is not None:
            pruned: list[str] = []
            meta = obj["metadata"]
            body = _prune({k: v for k, v in obj.items() if k != "metadata"},
                          self.crd_schema, "", pruned)
            obj.clear()
            obj.update({"apiVersion": kind.api_version, "kind": kind.kind, "metadata": meta})
            obj.update(body)
            warnings = [f'unknown field "{path}"' for path in pruned]
            errors += _validate_schema({k: v for k, v in obj.items() if k != "metadata"},
                                       self.crd_schema, "")
        if errors:
            raise _invalid_object(kind, obj["metadata"].get("name", ""), errors)
        return warnings

    def _commit(self, kind: Kind, type_: str, obj: Obj, prev: Obj | None) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        stored = copy.deepcopy(obj)
        if type_ == "DELETED":
            del self.objects[kind][_key(obj)]
        else:
            self.objects[kind][_key(obj)] = stored
        change = _Change(self.version, type_, kind, stored, copy.deepcopy(prev))
        self.history.append(change)
        while len(self.history) > self.history_limit:
            self.compacted = self.history.popleft().version
        for watcher in self.watchers:
            event = watcher.translate(change)
            if event is not None:
                watcher.pending.append(event)
                watcher.wake()

    def compact(self) -> None:
        with self.lock:
            self.history.clear()
            self.compacted = self.version

    # -- watches

    def open_watch(self, watcher: _Watcher, since: str) -> None:
        """Queue what the watcher missed and register it, in one step, so no write falls
        between; raises the 410 StatusError when ``since`` is older than the history."""
        with self.lock:
            if since in ("", "0"):
                current = self.objects[watcher.kind]
                for key in sorted(current):
                    if watcher.matches(current[key]):
                        watcher.pending.append(("ADDED", current[key]))
            else:
                version = _parse_version(since)
                if version < self.compacted:
                    raise _too_old(version, self.compacted)
                for change in self.history:
                    if change.version > version and (event := watcher.translate(change)):
                        watcher.pending.append(event)
            self.watchers.add(watcher)
            self.changed.notify_all()

    def close_watch(self, watcher: _Watcher) -> None:
        with self.lock:
            self.watchers.discard(watcher)
            self.changed.notify_all()

    def take(self, watcher: _Watcher) -> tuple[list[tuple[str, Obj]], int]:
        """The watcher's pending events, and the version they bring it to (for bookmarks)."""
        with self.lock:
            events = list(watcher.pending)
            watcher.pending.clear()
            return events, self.version


def _parse_version(text: str) -> int:
    try:
        version = int(text)
    except ValueError:
        raise _error(400, f"invalid resource version: {text!r}") from None
    if version < 0:
        raise _error(400, f"invalid resource version: {text!r}")
    return version


def _parse_bool(text: str | None, name: str) -> bool:
    if text is None or text == "":
        return False
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _error(400, f"invalid value for {name}: {text!r}")


def _event_line(type_: str, obj: Obj) -> bytes:
    return (json.dumps({"type": type_, "object": obj}, separators=(",", ":")) + "\n").encode()


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
    kind = next((k for k in WATCHED if (k.group, k.version, k.plural) == (group, version,
                                                                          rest[0])), None)
    if kind is None:
        return None
    name = rest[1] if len(rest) >= 2 else None
    subresource = rest[2] if len(rest) == 3 else None
    if name is not None and namespace is None:
        return None  # namespaced objects are only addressable in their namespace
    if subresource is not None and (subresource != "status" or kind not in _STATUS_SUBRESOURCE):
        return None
    return _Target(kind, namespace, name, subresource)


def _verb(method: str, target: _Target | None, query: Mapping[str, str]) -> str:
    if target is None:
        return "other"
    if target.name is None:
        if method == "GET":
            return "watch" if query.get("watch", "") in _TRUE else "list"
        return {"POST": "create", "DELETE": "deletecollection"}.get(method, "other")
    return {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        method, "other")


class ApiServerDouble:
    """See the module docstring. ``start()`` it (or use it as a context manager), point
    the client at ``kubeconfig(path)``, change the world with ``create``/``update``/
    ``delete``/``apply``, and break it with the fault methods."""

    def __init__(self, port: int = 0, *, history_limit: int = 1000,
                 bookmark_interval: float = 60.0, crd_installed: bool = True,
                 crd_schema: Obj | None = None, rbac: Rbac | bool = True,
                 too_large_wait: float = 3.0) -> None:
        """``crd_installed=False`` makes TrafficPolicy paths 404 until ``install_crd()``;
        ``crd_schema`` defaults to the schema of the CRD the project ships; ``rbac``:
        True authorizes the service account with the shipped ClusterRole, False allows
        it everything, an ``Rbac`` is that policy (``self.rbac`` may change at any time)."""
        self.port = port
        self.bookmark_interval = bookmark_interval
        self.rbac: Rbac | None = Rbac() if rbac is True else (rbac or None)
        self.too_large_wait = too_large_wait
        self.crd_installed = crd_installed
        self._store = _Store(history_limit, crd_schema or traffic_policy_schema())
        self._failures: list[_Failure] = []
        self._requests: list[RecordedRequest] = []
        self.server_errors: list[BaseException] = []  # handler crashes: a bug in the double
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    # -- lifecycle

    def start(self) -> ApiServerDouble:
        """Listen on 127.0.0.1:``port`` (0: a free one, kept for restarts)."""
        if self._thread is not None:
            raise RuntimeError("already started")
        sock = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR on POSIX
        with self._store.lock:
            self._store.closing = False
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sock, ready), daemon=True,
                                        name=f"apiserver-double-{self.port}")
        self._thread.start()
        if not ready.wait(10) or self._loop is None:
            sock.close()
            self._thread = None
            cause = self.server_errors[-1] if self.server_errors else None
            raise RuntimeError("the API server double did not start") from cause
        return self

    def stop(self) -> None:
        """Close every watch cleanly (a graceful shutdown), then the listener."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        with self._store.lock:
            self._store.closing = True
            for watcher in self._store.watchers:
                watcher.wake()
        if loop is not None and stopping is not None:
            loop.call_soon_threadsafe(stopping.set)
        thread.join(10)
        if thread.is_alive():
            raise RuntimeError("the API server double did not stop within 10 s")
        self._thread = self._loop = self._stopping = None

    def restart(self, keep_state: bool = False) -> None:
        """Stop and start on the same port. Objects and the resourceVersion counter always
        survive (they live in etcd); the watch history does not, as a fresh API server's
        watch cache starts empty, so every older resourceVersion gets 410 Expired.
        ``keep_state=True`` keeps the history (a load balancer's blip, not a restart)."""
        self.stop()
        if not keep_state:
            self._store.compact()
        self.start()

    def backup(self) -> Obj:
        """What etcd holds now: every object and the resourceVersion counter."""
        with self._store.lock:
            return {"version": self._store.version,
                    "objects": copy.deepcopy(self._store.objects)}

    def restore(self, backup: Obj) -> None:
        """Restart from an etcd backup: the objects and the counter go back in time, so a
        client's newer resourceVersion is "too large" for this server."""
        self.stop()
        with self._store.lock:
            self._store.objects = copy.deepcopy(backup["objects"])
            self._store.version = int(backup["version"])
            self._store.compact()
        self.start()

    def __enter__(self) -> ApiServerDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("not started")
        return f"http://127.0.0.1:{self.port}"

    def kubeconfig(self, path: str | Path, *, admin: bool = False) -> Path:
        """Write a kubeconfig for this server and return its path: the control plane's
        service account (RBAC applies), or with ``admin`` a cluster admin."""
        path = Path(path)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": "double", "user": {"token": ADMIN_TOKEN if admin else TOKEN}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "double",
                                                        "namespace": "default"}}],
            "current-context": "double",
        }
        path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        return path

    # -- the world, from Python (each write is one resourceVersion and one event)

    @property
    def resource_version(self) -> str:
        """The current (latest) resourceVersion."""
        with self._store.lock:
            return str(self._store.version)

    def create(self, obj: Obj) -> Obj:
        """Create as a POST would (default namespace: ``default``); returns the stored
        object. Raises StatusError (409 AlreadyExists, 422 Invalid, ...)."""
        return self._store.create(obj)[0]

    def update(self, obj: Obj) -> Obj:
        """Replace as a PUT would: conditional on metadata.resourceVersion when it is set;
        the status of a kind with a status subresource is kept."""
        return self._store.update(obj)[0]

    def update_status(self, obj: Obj) -> Obj:
        """Replace the status as a PUT of /status would; everything else is kept."""
        return self._store.update(obj, subresource="status")[0]

    def apply(self, obj: Obj) -> Obj:
        """Create, or update unconditionally if it exists (a test convenience, not SSA)."""
        kind = _kind_of(obj)
        meta = obj.get("metadata", {})
        with self._store.lock:
            exists = (meta.get("namespace") or "default", meta.get("name", "")) in (
                self._store.objects[kind])
            if exists:
                return self._store.update(obj, unconditional=True)[0]
            fresh = copy.deepcopy(obj)
            fresh.get("metadata", {}).pop("resourceVersion", None)
            return self._store.create(fresh)[0]

    def delete(self, kind: Kind | str, namespace: str, name: str) -> Obj:
        """Delete; returns the last state (at the deletion's resourceVersion)."""
        return self._store.delete(_kind_named(kind), namespace, name)

    def get(self, kind: Kind | str, namespace: str, name: str) -> Obj:
        """The stored object (a copy); raises StatusError 404 when there is none."""
        return self._store.get(_kind_named(kind), namespace, name)

    def objects(self, kind: Kind | str) -> list[Obj]:
        """Every stored object of a kind, in key order (copies)."""
        with self._store.lock:
            current = self._store.objects[_kind_named(kind)]
            return [copy.deepcopy(current[k]) for k in sorted(current)]

    def install_crd(self) -> None:
        """Serve TrafficPolicies (after ``crd_installed=False``)."""
        self.crd_installed = True

    # -- faults

    def compact(self) -> None:
        """Forget the history: watches from any older resourceVersion get 410 Expired,
        continue tokens from before expire too."""
        self._store.compact()

    def drop_watches(self) -> int:
        """Cut every open watch connection mid-stream, without the chunked terminator;
        returns how many."""
        with self._store.lock:
            for watcher in self._store.watchers:
                watcher.dropped = True
                watcher.wake()
            return len(self._store.watchers)

    def pause(self) -> None:
        """Watches go silent (no events, no bookmarks) but stay open; new watches get
        their headers and then nothing. Events are held, not lost."""
        with self._store.lock:
            self._store.paused = True

    def resume(self) -> None:
        """Deliver what was held and carry on."""
        with self._store.lock:
            self._store.paused = False
            for watcher in self._store.watchers:
                watcher.wake()

    def bookmark_now(self) -> None:
        """Send a BOOKMARK on every watch that allows them."""
        with self._store.lock:
            for watcher in self._store.watchers:
                watcher.bookmark_requested = True
                watcher.wake()

    def fail_next(self, n: int = 1, status: int = 500, *, path: str | None = None) -> None:
        """The next ``n`` requests (whose path starts with ``path``, if given) fail with
        ``status`` and a Status body; 429 also carries ``Retry-After: 1``."""
        with self._store.lock:
            self._failures.append(_Failure(n, status, path))

    # -- observation

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request so far, in order (a copy)."""
        with self._store.lock:
            return list(self._requests)

    def count(self, verb: str, kind: Kind | str | None = None) -> int:
        """How many requests with this verb (list, watch, get, create, patch, ...)."""
        wanted = _kind_named(kind) if kind is not None else None
        return sum(1 for r in self.requests
                   if r.verb == verb and (wanted is None or r.kind == wanted))

    def clear_requests(self) -> None:
        with self._store.lock:
            self._requests.clear()

    @property
    def open_watches(self) -> int:
        with self._store.lock:
            return len(self._store.watchers)

    def wait_for_watches(self, count: int, kind: Kind | str | None = None,
                         timeout: float = 5.0) -> None:
        """Block until at least ``count`` watches (of ``kind``) are open."""
        wanted = _kind_named(kind) if kind is not None else None

        def enough() -> bool:
            return sum(1 for w in self._store.watchers
                       if wanted is None or w.kind == wanted) >= count

        with self._store.changed:
            if not self._store.changed.wait_for(enough, timeout):
                raise TimeoutError(f"fewer than {count} watches open after {timeout} s")

    async def async_wait_for_watches(self, count: int, kind: Kind | str | None = None,
                                     timeout: float = 5.0) -> None:
        """``wait_for_watches`` for async tests (keeps their loop running)."""
        await asyncio.to_thread(self.wait_for_watches, count, kind, timeout)

    # -- the server thread

    def _run(self, sock: socket.socket, ready: threading.Event) -> None:
        try:
            asyncio.run(self._serve(sock, ready))
        except BaseException as exc:
            self.server_errors.append(exc)
            ready.set()

    async def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        """Record the request, inject failures, and turn StatusErrors into responses."""
        target = _route(request.path)
        query = dict(request.query)
        verb = _verb(request.method, target, query)
        with self._store.lock:
            self._requests.append(RecordedRequest(
                request.method, request.path, query, verb,
                target.kind if target else None, target.namespace if target else None,
                target.name if target else None, target.subresource if target else None,
                request.headers.get("Accept")))
            failure = next((f for f in self._failures
                            if f.remaining > 0 and (f.path is None
                                                    or request.path.startswith(f.path))), None)
            if failure is not None:
                failure.remaining -= 1
                self._failures = [f for f in self._failures if f.remaining > 0]
        try:
            if failure is not None:
                raise self._injected(failure.status)
            self._authorize(request, target, verb)
            response: web.StreamResponse = await handler(request)
            return response
        except StatusError as exc:
            return web.json_response(exc.status, status=exc.code, headers=exc.headers)
        except Exception as exc:
            self.server_errors.append(exc)
            return web.json_response(status_object(500, f"Internal error occurred: {exc}"),
                                     status=500)

    def _authorize(self, request: web.Request, target: _Target | None, verb: str) -> None:
        """Authentication by bearer token, then RBAC for the service account."""
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if token == ADMIN_TOKEN:
            return
        if token != TOKEN:
            raise _error(401, "Unauthorized")
        rbac = self.rbac
        if rbac is None or target is None:
            return  # discovery, /version and health are open to every authenticated user
        if not rbac.allows(verb, target.kind, target.namespace, target.subresource):
            raise StatusError(rbac.forbidden(verb, target.kind, target.namespace, target.name,
                                             target.subresource))

    @staticmethod
    def _injected(code: int) -> StatusError:
        if code == 429:
            return StatusError(status_object(429, "Too many requests, please try again later.",
                                             details={"retryAfterSeconds": 1}),
                               {"Retry-After": "1"})
        if code == 500:
            return _error(500, "Internal error occurred: injected by the API server double")
        return _error(code, f"injected by the API server double ({code})")

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        if request.path == "/version":
            return web.json_response({"major": "1", "minor": "33", "gitVersion": "v1.33.0"})
        target = _route(request.path)
        if target is None or (target.kind == TRAFFIC_POLICIES and not self.crd_installed):
            raise _resource_not_found()
        method = request.method
        watch = (method == "GET" and target.name is None
                 and _parse_bool(request.query.get("watch"), "watch"))
        output = _negotiate(request.headers.get("Accept", ""), target.kind, watch)
        if target.name is None:
            if method == "GET":
                if watch:
                    return await self._watch(request, target, output)
                await self._fresh_enough(request.query.get("resourceVersion", ""),
                                         request.query.get("resourceVersionMatch", ""))
                return self._list(request, target, output)
            if method == "POST" and target.namespace is not None:
                return await self._create(request, target, output)
        else:
            assert target.namespace is not None
            if method == "GET":
                return web.json_response(_represent(target.kind, self._store.get(
                    target.kind, target.namespace, target.name), output))
            if method in ("PUT", "PATCH"):
                return await self._write(request, target, output)
            if method == "DELETE" and target.subresource is None:
                gone = self._store.delete(target.kind, target.namespace, target.name)
                if target.kind == ENDPOINT_SLICES:  # its REST storage returns a Status
                    return web.json_response({
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Success", "details": {
                            **_details(target.kind, target.name),
                            "uid": gone["metadata"]["uid"]}})
                return web.json_response(_represent(target.kind, gone, output))
        raise _error(405, "the server does not allow this method on the requested resource")

    # -- LIST

    async def _fresh_enough(self, version: str, match: str) -> None:
        """A LIST at a resourceVersion (not "" or "0") newer than the server's waits for
        it, then fails as the watch cache does: 504 Too large resource version."""
        if version in ("", "0") or match == "Exact":
            return
        wanted = _parse_version(version)
        deadline = time.monotonic() + self.too_large_wait
        while True:
            with self._store.lock:
                current = self._store.version
            if current >= wanted:
                return
            if time.monotonic() >= deadline:
                raise _too_large(wanted, current)
            await asyncio.sleep(0.05)

    def _list(self, request: web.Request, target: _Target, output: _Output) -> web.Response:
        kind, query = target.kind, request.query
        labels = LabelSelector(query.get("labelSelector", ""))
        fields = FieldSelector(query.get("fieldSelector", ""))
        limit = int(query.get("limit") or 0)
        token = query.get("continue", "")
        with self._store.lock:
            if token:
                version, start = self._decode_continue(token)
                try:
                    state = self._store.state_at(kind, version)
                except StatusError:
                    raise _error(410, _CONTINUE_EXPIRED, "Expired") from None
            elif query.get("resourceVersionMatch") == "Exact":
                version = _parse_version(query.get("resourceVersion", ""))
                state, start = self._store.state_at(kind, version), None
            else:
                version, state, start = self._store.version, self._store.objects[kind], None
            keys = sorted(k for k, obj in state.items()
                          if (target.namespace is None or k[0] == target.namespace)
                          and labels.matches(obj) and fields.matches(obj))
            if start is not None:
                keys = [k for k in keys if "/".join(k) > start]
            page = keys[:limit] if limit > 0 else keys
            items = [copy.deepcopy(state[k]) for k in page]
        if kind in _BUILTIN:
            for item in items:
                item.pop("kind", None)
                item.pop("apiVersion", None)
        metadata: Obj = {"resourceVersion": str(version)}
        if len(page) < len(keys):
            metadata["continue"] = self._encode_continue(version, "/".join(page[-1]))
            if not labels.text and not query.get("fieldSelector"):
                metadata["remainingItemCount"] = len(keys) - len(page)
        return web.json_response(_represent_list(kind, {
            "kind": f"{kind.kind}List", "apiVersion": kind.api_version, "metadata": metadata,
            "items": items}, output))

    @staticmethod
    def _encode_continue(version: int, last_key: str) -> str:
        """The real token: base64url of {"v","rv","start"}, start just after the last key."""
        raw = json.dumps({"v": "meta.k8s.io/v1", "rv": version, "start": last_key + "\x00"},
                         separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @staticmethod
    def _decode_continue(token: str) -> tuple[int, str]:
        try:
            raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            return int(raw["rv"]), str(raw["start"]).rstrip("\x00")
        except (ValueError, KeyError, TypeError) as exc:
            raise _error(400, f"continue key is not valid: {exc}") from None

    # -- WATCH

    async def _watch(self, request: web.Request, target: _Target,
                     output: _Output) -> web.StreamResponse:
        query = request.query
        try:
            timeout = int(query.get("timeoutSeconds") or 0)
        except ValueError:
            raise _error(400, f"invalid timeoutSeconds: {query['timeoutSeconds']!r}") from None
        loop = asyncio.get_running_loop()
        watcher = _Watcher(target.kind, target.namespace,
                           LabelSelector(query.get("labelSelector", "")),
                           FieldSelector(query.get("fieldSelector", "")),
                           _parse_bool(query.get("allowWatchBookmarks"), "allowWatchBookmarks"),
                           loop, asyncio.Event(), output)
        response = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "Cache-Control": "no-cache, private"})
        response.enable_chunked_encoding()
        try:
            self._store.open_watch(watcher, query.get("resourceVersion", ""))
        except StatusError as exc:
            if exc.code != 410:
                raise
            # As the real server: a 200, then the Status as an ERROR event, then the end.
            await response.prepare(request)
            await response.write(_event_line("ERROR", exc.status))
            await response.write_eof()
            return response
        try:
            await response.prepare(request)
            await self._stream(request, response, watcher,
                               loop.time() + timeout if timeout else None)
        except ConnectionError:
            pass  # the client went away
        finally:
            self._store.close_watch(watcher)
        return response

    async def _stream(self, request: web.Request, response: web.StreamResponse,
                      watcher: _Watcher, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        next_bookmark = loop.time() + self.bookmark_interval
        while True:
            watcher.wakeup.clear()
            transport = request.transport
            if watcher.dropped:
                if transport is not None:
                    transport.abort()  # no terminating chunk: the client sees a broken stream
                return
            if self._store.closing or transport is None or transport.is_closing():
                break
            now = loop.time()
            if not self._store.paused:
                if deadline is not None and now >= deadline:
                    break
                events, version = self._store.take(watcher)
                for type_, obj in events:
                    await response.write(_event_line(type_, _represent(watcher.kind, obj,
                                                                       watcher.output)))
                if watcher.bookmarks and (watcher.bookmark_requested or now >= next_bookmark):
                    watcher.bookmark_requested = False
                    next_bookmark = now + self.bookmark_interval
                    await response.write(_event_line("BOOKMARK", _represent(watcher.kind, {
                        "kind": watcher.kind.kind, "apiVersion": watcher.kind.api_version,
                        "metadata": {"resourceVersion": str(version)}}, watcher.output)))
            wait = 0.25  # also how soon a vanished client is noticed
            if not self._store.paused:
                if deadline is not None:
                    wait = min(wait, deadline - now)
                if watcher.bookmarks:
                    wait = min(wait, next_bookmark - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watcher.wakeup.wait(), max(wait, 0.001))
        await response.write_eof()

    # -- writes over HTTP

    async def _body(self, request: web.Request) -> Any:
        try:
            return await request.json(loads=json.loads)
        except ValueError as exc:
            raise _error(400, f"the object provided is unrecognized: {exc}") from None

    def _check_body(self, body: Any, target: _Target) -> Obj:
        if not isinstance(body, dict):
            raise _error(400, "the object provided is unrecognized (must be a JSON object)")
        kind = target.kind
        if body.get("apiVersion", kind.api_version) != kind.api_version:
            raise _error(400, f"the API version in the data ({body['apiVersion']}) does not "
                         f"match the expected API version ({kind.api_version})")
        if body.get("kind", kind.kind) != kind.kind:
            raise _error(400, f"the kind in the data ({body['kind']}) does not match the "
                         f"expected kind ({kind.kind})")
        meta = body.setdefault("metadata", {})
        if meta.get("namespace", target.namespace) != target.namespace:
            raise _error(400, "the namespace of the provided object does not match the "
                         "namespace sent on the request")
        meta["namespace"] = target.namespace
        if target.name is not None and meta.get("name", target.name) != target.name:
            raise _error(400, f"the name of the object ({meta['name']}) does not match the "
                         f"name on the URL ({target.name})")
        if target.name is not None:
            meta["name"] = target.name
        body["apiVersion"], body["kind"] = kind.api_version, kind.kind
        return body

    async def _create(self, request: web.Request, target: _Target,
                      output: _Output) -> web.Response:
        body = self._check_body(await self._body(request), target)
        body = self._field_validation(request, body, target)
        obj, warnings = self._store.create(body, target.namespace)
        return self._respond(_represent(target.kind, obj, output), warnings, status=201)

    async def _write(self, request: web.Request, target: _Target,
                     output: _Output) -> web.Response:
        assert target.namespace is not None and target.name is not None
        if request.method == "PUT":
            body = self._check_body(await self._body(request), target)
        else:
            body = self._check_body(
                self._patched(request, await self._body(request),
                              self._store.get(target.kind, target.namespace, target.name)),
                target)
        body = self._field_validation(request, body, target)
        obj, warnings = self._store.update(body, subresource=target.subresource)
        return self._respond(_represent(target.kind, obj, output), warnings, status=200)

    @staticmethod
    def _patched(request: web.Request, patch: Any, current: Obj) -> Any:
        content_type = request.content_type
        if content_type == "application/merge-patch+json":
            return merge_patch(current, patch)
        if content_type == "application/json-patch+json":
            if not isinstance(patch, list):
                raise _error(400, "the JSON patch must be a list of operations")
            try:
                return json_patch(current, patch)
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise _error(422, f"the server rejected our request due to an error in our "
                             f"request: {exc}") from None
        # Strategic merge (built-ins only) and server-side apply are not implemented; a
        # loud 415 beats a silently wrong merge.
        raise _error(415, "the body of the request was in an unknown format - accepted media "
                     "types include: application/json-patch+json, "
                     "application/merge-patch+json (the API server double does not implement "
                     f"{content_type})")

    def _field_validation(self, request: web.Request, body: Obj, target: _Target) -> Obj:
        """fieldValidation=Strict turns pruned fields into a 400, as the real server does."""
        if request.query.get("fieldValidation") != "Strict" or self._store.crd_schema is None:
            return body
        if target.kind != TRAFFIC_POLICIES:
            return body
        pruned: list[str] = []
        _prune({k: v for k, v in body.items() if k != "metadata"}, self._store.crd_schema, "",
               pruned)
        if pruned:
            raise _error(400, "strict decoding error: " + ", ".join(
                f'unknown field "{p}"' for p in pruned))
        return body

    @staticmethod
    def _respond(obj: Obj, warnings: list[str], status: int) -> web.Response:
        """The object, with a ``Warning: 299`` header per pruned field (fieldValidation=Warn,
        the default)."""
        response = web.json_response(obj, status=status)
        for text in warnings:
            quoted = text.replace("\\", "\\\\").replace('"', '\\"')
            response.headers.add("Warning", f'299 - "{quoted}"')
        return response


_CONTINUE_EXPIRED: Final = (
    "The provided continue parameter is too old to display a consistent list result. You can "
    "start a new list without the continue parameter, or use the continue token in this "
    "response to retrieve the remainder of the results. Continuing with the provided token "
    "results in an inconsistent list - objects that were created, modified, or deleted "
    "between the time the first chunk was returned and now may show up in the list.")
