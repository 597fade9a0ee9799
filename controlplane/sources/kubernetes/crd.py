"""The TrafficPolicy, Sidecar and SecurityPolicy CustomResourceDefinitions, generated from
the pydantic ``Policy``, ``Sidecar`` and ``Security`` models.

The CRD's schema is derived, never written by hand, so the API server and the mesh model
cannot disagree about what a policy is. ``Policy.model_json_schema()`` is JSON Schema
2020-12; Kubernetes wants a *structural* OpenAPI v3 schema, so this module inlines every
``$ref``, turns ``Optional[X]`` (``anyOf: [X, null]``) into X, spells durations as
patterned strings and exclusive bounds the OpenAPI 3.0 way, and refuses any keyword it
cannot translate (a model change that Kubernetes cannot express fails loudly here).

The schema does not carry ``additionalProperties: false`` (structural schemas forbid it
beside ``properties``): the API server prunes unknown fields, and ``kubectl apply``'s
default strict field validation rejects them; the source still validates every spec with
the pydantic model and reports its errors in the object's status.

Pure: builds dictionaries, does no I/O.
"""

from __future__ import annotations

import json
from typing import Any, Final

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from controlplane.mesh.model import Policy
from controlplane.mesh.scope import Sidecar
from controlplane.mesh.security import Security
from controlplane.sources.kubernetes.kinds import (
    ACCEPTED,
    POLICY_GROUP,
    POLICY_KIND,
    POLICY_PLURAL,
    POLICY_SHORT_NAMES,
    POLICY_SINGULAR,
    POLICY_VERSION,
    RESOLVED_REFS,
    SECURITY_POLICY_KIND,
    SECURITY_POLICY_PLURAL,
    SECURITY_POLICY_SHORT_NAMES,
    SECURITY_POLICY_SINGULAR,
    SERVICES,
    SIDECAR_KIND,
    SIDECAR_PLURAL,
    SIDECAR_SINGULAR,
    TELEMETRY_KIND,
    TELEMETRY_PLURAL,
    TELEMETRY_SINGULAR,
)
from controlplane.sources.kubernetes.telemetry import spec_schema as telemetry_spec_schema

CRD_NAME: Final = f"{POLICY_PLURAL}.{POLICY_GROUP}"
SIDECAR_CRD_NAME: Final = f"{SIDECAR_PLURAL}.{POLICY_GROUP}"
SECURITY_POLICY_CRD_NAME: Final = f"{SECURITY_POLICY_PLURAL}.{POLICY_GROUP}"

# What controlplane.mesh.duration.parse_duration accepts as a string: one or more
# <number><unit> parts, no sign (negative durations are errors). [0-9], not \d: the API
# server's regular expressions (RE2) know only ASCII digits.
DURATION_PATTERN: Final = r"^\s*([0-9]+(\.[0-9]+)?(ms|us|s|m|h))+\s*$"
_DURATION_HELP: Final = "A duration such as 500ms, 2s or 1m30s (units: h, m, s, ms, us)."
# A Service name: a DNS label, as the model requires of service names.
_DNS_LABEL_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_LABEL: Final = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
# SecurityPolicy: a ServiceAccount as namespace/name (a DNS label, a DNS subdomain), a
# principal (a SPIFFE ID, optionally ending in *, or * alone), an HTTP method.
SERVICE_ACCOUNT_PATTERN: Final = rf"^{_LABEL}/{_LABEL}(\.{_LABEL})*$"
PRINCIPAL_PATTERN: Final = r"^(\*|spiffe://[^*\s]*\*?)$"
METHOD_PATTERN: Final = r"^[A-Z][A-Z0-9_-]{0,31}$"
# A Sidecar host: namespace/name, the namespace "." (the sidecar's own) or "*", the name "*".
HOST_PATTERN: Final = rf"^(\*|\.|{_LABEL})/(\*|{_LABEL})$"

# Keywords copied as they are: each means the same in JSON Schema and in Kubernetes.
_COPIED: Final = frozenset({
    "type", "description", "enum", "pattern", "format", "minimum", "maximum",
    "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
    "required",
})
# The order keywords are written in, so that the checked-in CRD reads top-down.
_ORDER: Final = (
    "description", "type", "format", "pattern", "enum", "minimum", "exclusiveMinimum",
    "maximum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems",
    "minProperties", "maxProperties", "required", "properties", "additionalProperties",
    "items",
)


class _KubernetesJsonSchema(GenerateJsonSchema):
    """Durations as the strings people write (``2s``), not ISO 8601 ``format: duration``."""

    def timedelta_schema(self, schema: core_schema.TimedeltaSchema) -> JsonSchemaValue:
        return {"type": "string", "pattern": DURATION_PATTERN, "description": _DURATION_HELP}


def _resolve(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """Inline ``$ref`` and collapse ``anyOf``/``allOf`` of one real branch (plus null)."""
    while True:
        if "$ref" in node:
            ref = node["$ref"]
            name = ref.removeprefix("#/$defs/")
            if name == ref or name not in defs:
                raise ValueError(f"{path}: cannot inline $ref {ref!r}")
            rest = {k: v for k, v in node.items() if k != "$ref"}
            node = {**defs[name], **rest}  # the field's own keys win over the model's
        elif "anyOf" in node or "allOf" in node:
            key = "anyOf" if "anyOf" in node else "allOf"
            branches = [b for b in node[key] if b != {"type": "null"}]
            if len(branches) != 1:
                raise ValueError(
                    f"{path}: {key} with {len(branches)} non-null branches has no structural "
                    "equivalent; use one type per field"
                )
            rest = {k: v for k, v in node.items() if k != key}
            node = {**branches[0], **rest}
        else:
            return node


def structural(node: dict[str, Any], defs: dict[str, Any], path: str = "spec") -> dict[str, Any]:
    """One JSON Schema node (pydantic's) as a Kubernetes structural schema node."""
    node = _resolve(node, defs, path)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs"):
            continue
        if key == "default":
            # The model applies its defaults; the API server would only store them.
            if value is not None:
                note = f"Defaults to {json.dumps(value)}."
                out["description"] = f"{node['description']} {note}" if (
                    "description" in node) else note
        elif key == "description":
            out.setdefault("description", value)
        elif key == "properties":
            out[key] = {name: structural(sub, defs, f"{path}.{name}")
                        for name, sub in value.items()}
        elif key == "items":
            if not isinstance(value, dict):
                raise ValueError(f"{path}: tuple-style items have no structural equivalent")
            out[key] = structural(value, defs, f"{path}[]")
        elif key == "additionalProperties":
            if value is False:
                continue  # extra="forbid": see the module docstring
            if not isinstance(value, dict):
                raise ValueError(f"{path}: additionalProperties {value!r} is not structural")
            out[key] = structural(value, defs, f"{path}.*")
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            if bound in node:
                raise ValueError(f"{path}: both {bound} and {key}")
            out[bound], out[key] = value, True  # OpenAPI 3.0: a flag on the bound
        elif key == "const":
            out["enum"] = [value]
        elif key in _COPIED:
            out[key] = value
        else:
            raise ValueError(f"{path}: JSON Schema keyword {key!r} has no structural equivalent")
    if node.get("format") == "duration":
        raise ValueError(f"{path}: a duration that is not the model's Duration type")
    if "type" not in out:
        raise ValueError(f"{path}: no type; structural schemas need one on every node")
    if out["type"] == "object" and "properties" not in out and "additionalProperties" not in out:
        raise ValueError(f"{path}: an object with neither properties nor a value schema")
    if "properties" in out and "additionalProperties" in out:
        raise ValueError(f"{path}: both properties and additionalProperties")
    return {key: out[key] for key in sorted(out, key=_ORDER.index)}


def policy_schema() -> dict[str, Any]:
    """The ``Policy`` model as a structural schema: the spec minus ``targetRef``."""
    raw = Policy.model_json_schema(schema_generator=_KubernetesJsonSchema)
    defs = raw.pop("$defs", {})
    raw.pop("description", None)  # the model's docstring speaks of the mesh file
    return structural(raw, defs)


def _target_ref() -> dict[str, Any]:
    return {
        "description": "The Service whose traffic this policy governs, in the policy's "
                       "namespace.",
        "type": "object",
        "required": ["kind", "name"],
        "properties": {
            "kind": {"type": "string", "enum": [SERVICES.kind]},
            "name": {"type": "string", "pattern": _DNS_LABEL_PATTERN, "minLength": 1,
                     "maxLength": 63},
        },
    }


def _status() -> dict[str, Any]:
    """Conditions in the shape of metav1.Condition; ``Accepted`` says whether the spec
    passed the model and, when not, why."""
    condition = {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string", "maxLength": 316},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string", "maxLength": 1024},
            "message": {"type": "string", "maxLength": 32768},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
        },
    }
    return {
        "description": "Set by the control plane.",
        "type": "object",
        "properties": {
            "conditions": {
                "description": f"{ACCEPTED}: whether the spec is valid and served; its "
                               "message names every invalid field.",
                "type": "array",
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
        },
    }


def spec_schema() -> dict[str, Any]:
    """``targetRef`` plus every field of the ``Policy`` model."""
    policy = policy_schema()
    return {
        "description": "Service governance for the target Service: the mesh file's policy "
                       "block plus targetRef. Every policy field is optional.",
        "type": "object",
        "required": ["targetRef", *policy.get("required", [])],
        "properties": {"targetRef": _target_ref(), **policy["properties"]},
    }


def _crd(plural: str, singular: str, kind: str, short_names: list[str],
         columns: list[dict[str, Any]], description: str,
         spec: dict[str, Any]) -> dict[str, Any]:
    """A namespaced CRD of our group, one version, with the status subresource."""
    accepted = f'.status.conditions[?(@.type=="{ACCEPTED}")]'
    names: dict[str, Any] = {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                             "singular": singular}
    if short_names:
        names["shortNames"] = short_names
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{POLICY_GROUP}",
                     "labels": {"app.kubernetes.io/name": "controlplane"}},
        "spec": {
            "group": POLICY_GROUP,
            "scope": "Namespaced",
            "names": names,
            "versions": [{
                "name": POLICY_VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    *columns,
                    {"name": ACCEPTED, "type": "string", "jsonPath": f"{accepted}.status"},
                    {"name": "Reason", "type": "string", "jsonPath": f"{accepted}.reason",
                     "priority": 1},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "description": description,
                    "type": "object",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec,
                        "status": _status(),
                    },
                }},
            }],
        },
    }


def traffic_policy_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition, ready to dump as YAML."""
    return _crd(POLICY_PLURAL, POLICY_SINGULAR, POLICY_KIND, list(POLICY_SHORT_NAMES),
                [{"name": "Target", "type": "string", "jsonPath": ".spec.targetRef.name"}],
                f"{POLICY_KIND}: timeouts, retries, circuit breaking, outlier detection, load "
                "balancing, traffic splitting, fault injection and rate limiting for one "
                "Service.", spec_schema())


def sidecar_spec_schema() -> dict[str, Any]:
    """The ``Sidecar`` model minus name and namespace (the object's metadata), with the
    checks its validators make that a schema can say: host patterns, non-empty lists."""
    raw = Sidecar.model_json_schema(schema_generator=_KubernetesJsonSchema)
    defs = raw.pop("$defs", {})
    for field in ("name", "namespace"):
        raw["properties"].pop(field)
    raw["required"] = [r for r in raw["required"] if r not in ("name", "namespace")]
    spec = structural(raw, defs)
    spec["description"] = (
        "What the sidecars of this namespace (or, with workloadSelector, of one service "
        "there) may reach; the mesh file's sidecars entry minus name and namespace. "
        "Sidecars no Sidecar selects reach every service exported to their namespace.")
    selector = spec["properties"]["workloadSelector"]
    selector["description"] = ("The sidecars this applies to: those of one service (the "
                               "sidecar's node.cluster). Omitted: every sidecar of the "
                               "namespace.")
    selector["properties"]["service"].update(pattern=_DNS_LABEL_PATTERN, maxLength=63)
    egress = spec["properties"]["egress"]
    egress["minItems"] = 1
    hosts = egress["items"]["properties"]["hosts"]
    hosts.update(minItems=1, description=(
        "namespace/name of each service reachable: 'pay/payments', 'pay/*' (every service "
        "of pay), '*/ratings', './*' (the sidecar's own namespace)."))
    hosts["items"].update(pattern=HOST_PATTERN, maxLength=127)
    return _ordered(spec)


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """Keywords in ``_ORDER`` again, at every level, after edits."""
    out = {key: node[key] for key in sorted(node, key=_ORDER.index)}
    if "properties" in out:
        out["properties"] = {k: _ordered(v) for k, v in out["properties"].items()}
    if "items" in out:
        out["items"] = _ordered(out["items"])
    return out


def sidecar_crd() -> dict[str, Any]:
    """The Sidecar CustomResourceDefinition (Istio's Sidecar egress hosts, in our group)."""
    return _crd(SIDECAR_PLURAL, SIDECAR_SINGULAR, SIDECAR_KIND, [],
                [{"name": "Service", "type": "string",
                  "jsonPath": ".spec.workloadSelector.service"},
                 {"name": RESOLVED_REFS, "type": "string", "priority": 1,
                  "jsonPath": f'.status.conditions[?(@.type=="{RESOLVED_REFS}")].status'}],
                f"{SIDECAR_KIND}: which services the sidecars of a namespace (or of one "
                "service) may reach; they get the configuration of those only.",
                sidecar_spec_schema())


def security_policy_spec_schema() -> dict[str, Any]:
    """The ``Security`` model (the mesh file's security block: mtls and authorization)
    plus ``target``, the Service it applies to."""
    raw = Security.model_json_schema(schema_generator=_KubernetesJsonSchema)
    defs = raw.pop("$defs", {})
    raw.pop("description", None)  # the model's docstring speaks of the mesh file
    spec = structural(raw, defs)
    spec["description"] = (
        "mTLS mode and authorization rules, the mesh file's security block. With target: "
        "for that Service of this namespace; without: for every service of this namespace, "
        "or, in the control plane's namespace, of the whole mesh. A service's own block "
        "overrides its namespace's mtls mode, which overrides the mesh's; the rules of all "
        "three apply, deny rules first.")
    # What the model's validators check that a pattern can say: kubectl apply refuses
    # these at once (the model still checks everything and names the field in the status).
    rule = spec["properties"]["authorization"]["items"]
    rule["properties"]["name"].update(pattern=_DNS_LABEL_PATTERN, maxLength=63)
    source = rule["properties"]["from"]["items"]["properties"]
    source["service_accounts"]["items"].update(pattern=SERVICE_ACCOUNT_PATTERN, maxLength=317)
    source["namespaces"]["items"].update(pattern=_DNS_LABEL_PATTERN, maxLength=63)
    source["principals"]["items"].update(pattern=PRINCIPAL_PATTERN, maxLength=2048)
    operation = rule["properties"]["to"]["items"]["properties"]
    operation["methods"]["items"].update(pattern=METHOD_PATTERN)
    spec["properties"] = {"target": {
        "description": "The Service this applies to, in this namespace. Omitted: every "
                       "service of the namespace (the mesh, in the control plane's "
                       "namespace).",
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "pattern": _DNS_LABEL_PATTERN,
                                "minLength": 1, "maxLength": 63}},
    }, **spec["properties"]}
    return _ordered(spec)


def security_policy_crd() -> dict[str, Any]:
    """The SecurityPolicy CustomResourceDefinition (Istio's PeerAuthentication and
    AuthorizationPolicy in one, in our group)."""
    return _crd(SECURITY_POLICY_PLURAL, SECURITY_POLICY_SINGULAR, SECURITY_POLICY_KIND,
                list(SECURITY_POLICY_SHORT_NAMES),
                [{"name": "Target", "type": "string", "jsonPath": ".spec.target.name"},
                 {"name": "mTLS", "type": "string", "jsonPath": ".spec.mtls.mode"},
                 {"name": RESOLVED_REFS, "type": "string", "priority": 1,
                  "jsonPath": f'.status.conditions[?(@.type=="{RESOLVED_REFS}")].status'}],
                f"{SECURITY_POLICY_KIND}: the mTLS mode (strict, permissive, disable) and "
                "the authorization rules (allow or deny by caller identity, namespace, "
                "method, path, port and header) of one Service, a namespace, or the mesh.",
                security_policy_spec_schema())


def telemetry_crd() -> dict[str, Any]:
    """The Telemetry CustomResourceDefinition (Istio's Telemetry, in our group)."""
    return _crd(TELEMETRY_PLURAL, TELEMETRY_SINGULAR, TELEMETRY_KIND, [],
                [{"name": "Target", "type": "string", "jsonPath": ".spec.targetRef.name"},
                 {"name": "Tracing", "type": "string", "jsonPath": ".spec.tracing.address"}],
                f"{TELEMETRY_KIND}: the sidecars' JSON access log and OpenTelemetry tracing "
                "for one Service, a namespace, or the mesh.", telemetry_spec_schema())
