"""The Gateway API kinds the double serves: each kind's structural schema, as the upstream
CRDs (deploy/gateway-api pins the release) declare the fields the control plane relies
on: their types, enums, bounds, required fields and defaults. The real API server prunes
what a CRD does not declare, defaults what it declares with a ``default``, and refuses
values out of bounds; so does the double.

Not the upstream YAML (that is shipped by URL, not copied): a subset, written from the
Gateway API reference. CEL rules (``x-kubernetes-validations``) are not modelled.

``SCHEMAS`` is the table the double serves: append a kind and its schema to serve it.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from controlplane.sources.kubernetes.kinds import (
    GATEWAY_API_GROUP,
    GATEWAY_CLASSES,
    GATEWAYS,
    GRPC_ROUTES,
    HTTP_ROUTES,
    REFERENCE_GRANTS,
    TCP_ROUTES,
    TLS_ROUTES,
    Kind,
)

Obj = dict[str, Any]

_DURATION: Final = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"  # GEP-2257
_NAME: Final[Obj] = {"type": "string", "minLength": 1, "maxLength": 253}
_GROUP: Final[Obj] = {"type": "string", "maxLength": 253,
                      "pattern": r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*"
                                 r"[a-z0-9])?)*$"}
_KIND: Final[Obj] = {"type": "string", "minLength": 1, "maxLength": 63,
                     "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"}
_PORT: Final[Obj] = {"type": "integer", "minimum": 1, "maximum": 65535}


def _object(properties: Obj, required: tuple[str, ...] = (), **extra: Any) -> Obj:
    schema: Obj = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    return schema


def _array(items: Obj, max_items: int, **extra: Any) -> Obj:
    return {"type": "array", "items": items, "maxItems": max_items, **extra}


_PARENT_REF: Final = _object({
    "group": {**_GROUP, "default": GATEWAY_API_GROUP},
    "kind": {**_KIND, "default": "Gateway"},
    "namespace": {"type": "string", "minLength": 1, "maxLength": 63},
    "name": _NAME,
    "sectionName": {"type": "string", "minLength": 1, "maxLength": 253},
    "port": _PORT,
}, ("name",))
_HEADER_VALUE: Final = _object({"name": {"type": "string", "minLength": 1, "maxLength": 256},
                                "value": {"type": "string", "minLength": 1,
                                          "maxLength": 4096}}, ("name", "value"))
_HEADER_MODIFIER: Final = _object({
    "set": _array(_HEADER_VALUE, 16), "add": _array(_HEADER_VALUE, 16),
    "remove": _array({"type": "string", "minLength": 1, "maxLength": 256}, 16)})
_BACKEND_OBJECT: Final = {
    "group": {**_GROUP, "default": ""},
    "kind": {**_KIND, "default": "Service"},
    "name": _NAME,
    "namespace": {"type": "string", "minLength": 1, "maxLength": 63},
    "port": _PORT,
}
_MIRROR: Final = _object({
    "backendRef": _object(_BACKEND_OBJECT, ("name",)),
    "percent": {"type": "integer", "minimum": 0, "maximum": 100},
    "fraction": _object({"numerator": {"type": "integer", "minimum": 0},
                         "denominator": {"type": "integer", "minimum": 1, "default": 100}},
                        ("numerator",)),
}, ("backendRef",))
_PATH_MODIFIER: Final = _object({
    "type": {"type": "string", "enum": ["ReplaceFullPath", "ReplacePrefixMatch"]},
    "replaceFullPath": {"type": "string", "maxLength": 1024},
    "replacePrefixMatch": {"type": "string", "maxLength": 1024},
}, ("type",))
_EXTENSION_REF: Final = _object({"group": _GROUP, "kind": _KIND, "name": _NAME},
                                ("group", "kind", "name"))


def _filters(types: list[str], http: bool) -> Obj:
    properties: Obj = {
        "type": {"type": "string", "enum": types},
        "requestHeaderModifier": _HEADER_MODIFIER,
        "responseHeaderModifier": _HEADER_MODIFIER,
        "requestMirror": _MIRROR,
        "extensionRef": _EXTENSION_REF,
    }
    if http:
        properties["requestRedirect"] = _object({
            "scheme": {"type": "string", "enum": ["http", "https"]},
            "hostname": {"type": "string", "minLength": 1, "maxLength": 253},
            "path": _PATH_MODIFIER,
            "port": _PORT,
            "statusCode": {"type": "integer", "enum": [301, 302], "default": 302},
        })
        properties["urlRewrite"] = _object({
            "hostname": {"type": "string", "minLength": 1, "maxLength": 253},
            "path": _PATH_MODIFIER,
        })
    return _array(_object(properties, ("type",)), 16)


_HTTP_FILTERS: Final = ["RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror",
                        "RequestRedirect", "URLRewrite", "ExtensionRef"]
_GRPC_FILTERS: Final = ["ResponseHeaderModifier", "RequestHeaderModifier", "RequestMirror",
                        "ExtensionRef"]


def _backend_refs(filters: Obj) -> Obj:
    return _array(_object({
        **_BACKEND_OBJECT,
        "weight": {"type": "integer", "minimum": 0, "maximum": 1000000, "default": 1},
        "filters": filters,
    }, ("name",)), 16)


def _header_match(types: list[str]) -> Obj:
    return _array(_object({
        "type": {"type": "string", "enum": types, "default": "Exact"},
        "name": {"type": "string", "minLength": 1, "maxLength": 256},
        "value": {"type": "string", "minLength": 1, "maxLength": 4096},
    }, ("name", "value")), 16)


_DEFAULT_MATCH: Final = {"path": {"type": "PathPrefix", "value": "/"}}
_HTTP_MATCH: Final = _object({
    "path": _object({
        "type": {"type": "string", "enum": ["Exact", "PathPrefix", "RegularExpression"],
                 "default": "PathPrefix"},
        "value": {"type": "string", "maxLength": 1024, "default": "/"},
    }, default=_DEFAULT_MATCH["path"]),
    "headers": _header_match(["Exact", "RegularExpression"]),
    "queryParams": _header_match(["Exact", "RegularExpression"]),
    "method": {"type": "string", "enum": ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT",
                                          "OPTIONS", "TRACE", "PATCH"]},
})
_HTTP_RULE: Final = _object({
    "matches": _array(_HTTP_MATCH, 64, default=[_DEFAULT_MATCH]),
    "filters": _filters(_HTTP_FILTERS, http=True),
    "backendRefs": _backend_refs(_filters(_HTTP_FILTERS, http=True)),
    "timeouts": _object({"request": {"type": "string", "pattern": _DURATION},
                         "backendRequest": {"type": "string", "pattern": _DURATION}}),
    # the experimental channel's (GEP-1731)
    "retry": _object({
        "codes": _array({"type": "integer", "minimum": 400, "maximum": 599}, 64),
        "attempts": {"type": "integer", "minimum": 0},
        "backoff": {"type": "string", "pattern": _DURATION},
    }),
})
_GRPC_RULE: Final = _object({
    "matches": _array(_object({
        "method": _object({
            "type": {"type": "string", "enum": ["Exact", "RegularExpression"],
                     "default": "Exact"},
            "service": {"type": "string", "maxLength": 1024},
            "method": {"type": "string", "maxLength": 1024},
        }),
        "headers": _header_match(["Exact", "RegularExpression"]),
    }), 64),
    "filters": _filters(_GRPC_FILTERS, http=False),
    "backendRefs": _backend_refs(_filters(_GRPC_FILTERS, http=False)),
})
_CONDITION: Final = _object({
    "type": {"type": "string", "minLength": 1, "maxLength": 316},
    "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
    "observedGeneration": {"type": "integer", "minimum": 0},
    "lastTransitionTime": {"type": "string"},
    "reason": {"type": "string", "minLength": 1, "maxLength": 1024},
    "message": {"type": "string", "maxLength": 32768},
}, ("type", "status", "lastTransitionTime", "reason", "message"))
_ROUTE_STATUS: Final = _object({"parents": _array(_object({
    "parentRef": _PARENT_REF,
    "controllerName": {"type": "string", "minLength": 1, "maxLength": 253},
    "conditions": _array(_CONDITION, 8, minItems=1),
}, ("parentRef", "controllerName", "conditions")), 32)}, ("parents",))


def _route(rule: Obj, default_rules: list[Obj] | None) -> Obj:
    rules = _array(rule, 16)
    if default_rules is not None:
        rules["default"] = default_rules
    return _object({
        "spec": _object({
            "parentRefs": _array(_PARENT_REF, 32),
            "hostnames": _array({"type": "string", "minLength": 1, "maxLength": 253}, 16),
            "rules": rules,
        }),
        "status": _ROUTE_STATUS,
    }, ("spec",))


_GRANT_FROM: Final = _object({"group": {**_GROUP}, "kind": _KIND,
                              "namespace": {"type": "string", "minLength": 1,
                                            "maxLength": 63}},
                             ("group", "kind", "namespace"))
_GRANT_TO: Final = _object({"group": {**_GROUP}, "kind": _KIND, "name": _NAME},
                           ("group", "kind"))

SCHEMAS: Final[dict[Kind, Obj]] = {
    HTTP_ROUTES: _route(_HTTP_RULE, [{"matches": [_DEFAULT_MATCH]}]),
    GRPC_ROUTES: _route(_GRPC_RULE, None),
    REFERENCE_GRANTS: _object({"spec": _object({
        "from": _array(_GRANT_FROM, 16, minItems=1),
        "to": _array(_GRANT_TO, 16, minItems=1),
    }, ("from", "to"))}),
}
# The ingress half (the gateway controller's kinds): GatewayClass, Gateway (v1, standard
# channel) and TLSRoute (v1alpha2, experimental channel).
_LABELS: Final = {"type": "object", "maxProperties": 8,
                  "additionalProperties": {"type": "string", "maxLength": 4096}}
_CERTIFICATE_REF: Final = _object({"group": {**_GROUP, "default": ""},
                                   "kind": {**_KIND, "default": "Secret"}, "name": _NAME,
                                   "namespace": {"type": "string", "minLength": 1,
                                                 "maxLength": 63}}, ("name",))
_LISTENER: Final = _object({
    "name": {"type": "string", "minLength": 1, "maxLength": 253},
    "hostname": {"type": "string", "minLength": 1, "maxLength": 253},
    "port": _PORT,
    "protocol": {"type": "string", "minLength": 1, "maxLength": 255},
    "tls": _object({
        "mode": {"type": "string", "enum": ["Terminate", "Passthrough"],
                 "default": "Terminate"},
        "certificateRefs": _array(_CERTIFICATE_REF, 64),
        "options": {"type": "object", "maxProperties": 16,
                    "additionalProperties": {"type": "string", "maxLength": 4096}},
    }),
    "allowedRoutes": _object({
        "namespaces": _object({
            "from": {"type": "string", "enum": ["All", "Selector", "Same"],
                     "default": "Same"},
            "selector": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        }, default={"from": "Same"}),
        "kinds": _array(_object({"group": _GROUP, "kind": _KIND}, ("kind",)), 8),
    }, default={"namespaces": {"from": "Same"}}),
}, ("name", "port", "protocol"))
_ADDRESS: Final = _object({"type": {"type": "string", "maxLength": 253,
                                    "default": "IPAddress"},
                           "value": {"type": "string", "minLength": 1, "maxLength": 253}},
                          ("value",))
_LISTENER_STATUS: Final = _object({
    "name": {"type": "string", "minLength": 1, "maxLength": 253},
    "supportedKinds": _array(_object({"group": _GROUP, "kind": _KIND}, ("kind",)), 8),
    "attachedRoutes": {"type": "integer", "format": "int32"},
    "conditions": _array(_CONDITION, 8),
}, ("name", "supportedKinds", "attachedRoutes", "conditions"))
SCHEMAS[GATEWAY_CLASSES] = _object({
    "spec": _object({
        "controllerName": {"type": "string", "minLength": 1, "maxLength": 253,
                           "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*"
                                      r"[a-z0-9])?)*\/[A-Za-z0-9\/\-._~%!$&'()*+,;=:]+$"},
        "parametersRef": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "description": {"type": "string", "maxLength": 64},
    }, ("controllerName",)),
    "status": _object({"conditions": _array(_CONDITION, 8),
                       "supportedFeatures": _array(_object({"name": _NAME}), 64)}),
}, ("spec",))
SCHEMAS[GATEWAYS] = _object({
    "spec": _object({
        "gatewayClassName": _NAME,
        "listeners": _array(_LISTENER, 64, minItems=1),
        "addresses": _array(_ADDRESS, 16),
        "infrastructure": _object({"labels": _LABELS, "annotations": _LABELS,
                                   "parametersRef": {"type": "object",
                                                     "x-kubernetes-preserve-unknown-fields":
                                                         True}}),
    }, ("gatewayClassName", "listeners")),
    "status": _object({"addresses": _array(_ADDRESS, 16),
                       "conditions": _array(_CONDITION, 8),
                       "listeners": _array(_LISTENER_STATUS, 64)}),
}, ("spec",))
# TLSRoute's and TCPRoute's rules: named, each with 1 to 16 weighted backends.
_L4_RULES: Final = _array(_object({
    "name": {"type": "string", "minLength": 1, "maxLength": 253},
    "backendRefs": _array(_object({
        **_BACKEND_OBJECT,
        "weight": {"type": "integer", "minimum": 0, "maximum": 1000000,
                   "default": 1}}, ("name",)), 16, minItems=1)}), 16, minItems=1)
SCHEMAS[TLS_ROUTES] = _object({
    "spec": _object({
        "parentRefs": _array(_PARENT_REF, 32),
        "hostnames": _array({"type": "string", "minLength": 1, "maxLength": 253}, 16),
        "rules": _L4_RULES,
    }, ("rules",)),
    "status": _ROUTE_STATUS,
}, ("spec",))
# TCPRoute (v1alpha2, experimental channel): TLSRoute's spec without hostnames.
SCHEMAS[TCP_ROUTES] = _object({
    "spec": _object({
        "parentRefs": _array(_PARENT_REF, 32),
        "rules": _L4_RULES,
    }, ("rules",)),
    "status": _ROUTE_STATUS,
}, ("spec",))
STATUS_SUBRESOURCE: Final = frozenset({HTTP_ROUTES, GRPC_ROUTES, GATEWAY_CLASSES, GATEWAYS,
                                       TLS_ROUTES, TCP_ROUTES})


def schemas() -> dict[Kind, Obj]:
    """The table, copied (the double's store keeps its own)."""
    return copy.deepcopy(SCHEMAS)


def apply_defaults(value: Any, schema: Obj) -> Any:
    """Fill in each absent property the schema gives a ``default``, at every depth, as
    the API server does for a structural schema (before validation)."""
    if isinstance(value, dict) and schema.get("type") == "object":
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(value[name], sub)
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(item, schema["items"]) for item in value]
    return value
