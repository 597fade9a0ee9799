"""Defaulting and validation of the kinds the double serves, with the real messages
(Services, EndpointSlices, Pods, the TrafficPolicy CRD's structural schema).

Part of the API server double (tests/kube/apiserver.py).
"""

from __future__ import annotations

import copy
import ipaddress
import re
from typing import Any, Final

from controlplane.sources.kubernetes.kinds import (
    SERVICES,
    Kind,
)
from tests.kube.constants import (
    Obj,
)
from tests.kube.errors import (
    FieldError,
    _duplicate,
    _invalid,
    _not_supported,
    _required,
)

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


def sidecar_schema() -> Obj:
    """The openAPIV3Schema of the Sidecar CRD the project ships."""
    from controlplane.sources.kubernetes.crd import sidecar_crd

    return dict(sidecar_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def security_policy_schema() -> Obj:
    """The openAPIV3Schema of the SecurityPolicy CRD the project ships."""
    from controlplane.sources.kubernetes.crd import security_policy_crd

    return dict(security_policy_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def telemetry_schema() -> Obj:
    """The openAPIV3Schema of the Telemetry CRD the project ships."""
    from controlplane.sources.kubernetes.crd import telemetry_crd

    return dict(telemetry_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


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


