"""The TrafficPolicy CustomResourceDefinition, generated from the pydantic ``Policy`` model.

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
from controlplane.sources.kubernetes.kinds import (
    ACCEPTED,
    POLICY_GROUP,
    POLICY_KIND,
    POLICY_PLURAL,
    POLICY_SHORT_NAMES,
    POLICY_SINGULAR,
    POLICY_VERSION,
    SERVICES,
)

CRD_NAME: Final = f"{POLICY_PLURAL}.{POLICY_GROUP}"

# What controlplane.mesh.duration.parse_duration accepts as a string: one or more
# <number><unit> parts, no sign (negative durations are errors). [0-9], not \d: the API
# server's regular expressions (RE2) know only ASCII digits.
DURATION_PATTERN: Final = r"^\s*([0-9]+(\.[0-9]+)?(ms|us|s|m|h))+\s*$"
_DURATION_HELP: Final = "A duration such as 500ms, 2s or 1m30s (units: h, m, s, ms, us)."
# A Service name: a DNS label, as the model requires of service names.
_DNS_LABEL_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

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


def traffic_policy_crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition, ready to dump as YAML."""
    accepted = f'.status.conditions[?(@.type=="{ACCEPTED}")]'
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/name": "controlplane"}},
        "spec": {
            "group": POLICY_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": POLICY_KIND,
                "listKind": f"{POLICY_KIND}List",
                "plural": POLICY_PLURAL,
                "singular": POLICY_SINGULAR,
                "shortNames": list(POLICY_SHORT_NAMES),
            },
            "versions": [{
                "name": POLICY_VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Target", "type": "string", "jsonPath": ".spec.targetRef.name"},
                    {"name": ACCEPTED, "type": "string", "jsonPath": f"{accepted}.status"},
                    {"name": "Reason", "type": "string", "jsonPath": f"{accepted}.reason",
                     "priority": 1},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "description": f"{POLICY_KIND}: timeouts, retries, circuit breaking, "
                                   "outlier detection, load balancing, traffic splitting, fault "
                                   "injection and rate limiting for one Service.",
                    "type": "object",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema(),
                        "status": _status(),
                    },
                }},
            }],
        },
    }
