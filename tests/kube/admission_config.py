"""Defaulting and validation of the kinds the webhook writes: Secrets (its serving
certificate) and MutatingWebhookConfigurations (its caBundle), with the real messages.

Part of the API server double (tests/kube/apiserver.py).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Final

from tests.kube.constants import (
    Obj,
)
from tests.kube.errors import (
    FieldError,
    _duplicate,
    _error,
    _invalid,
    _not_supported,
    _required,
)

_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_SECRET_MAX_BYTES: Final = 1024 * 1024  # core/v1 MaxSecretSize
_TLS_KEYS: Final = ("tls.crt", "tls.key")


def _decode(value: Any, path: str) -> bytes:
    """A []byte field as encoding/json reads it: base64, or a 400 for the whole request."""
    if not isinstance(value, str):
        raise _error(400, f"json: cannot unmarshal {type(value).__name__} into Go struct field "
                     f"{path} of type []uint8")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _error(400, f"illegal base64 data in {path}") from None


def _default_secret(obj: Obj) -> None:
    """``stringData`` is write-only: merged into ``data`` (base64) and dropped."""
    obj.setdefault("type", "Opaque")
    string_data = obj.pop("stringData", None)
    if isinstance(string_data, dict):
        data = obj.setdefault("data", {})
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()


def _validate_secret(obj: Obj, old: Obj | None) -> list[FieldError]:
    errors: list[FieldError] = []
    data = obj.get("data") or {}
    total = 0
    for key, value in data.items():
        if not _CONFIG_KEY.match(key):
            errors.append(_invalid(f"data[{key}]", key, "a valid config key must consist of "
                                   "alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',"
                                   "  or 'KEY_NAME',  or 'key-name', regex used for "
                                   "validation is '[-._a-zA-Z0-9]+')"))
        total += len(_decode(value, f"Secret.data.{key}"))
    if total > _SECRET_MAX_BYTES:
        errors.append(FieldError("data", "FieldValueTooLong",
                                 f"Too long: must have at most {_SECRET_MAX_BYTES} bytes"))
    if obj.get("type") == "kubernetes.io/tls":
        errors.extend(_required(f"data[{key}]") for key in _TLS_KEYS if key not in data)
    if old is not None and old.get("type") != obj.get("type"):
        errors.append(_invalid("type", obj.get("type"), "field is immutable"))
    return errors


def _default_webhooks(obj: Obj) -> None:
    """admissionregistration/v1 defaults (SetDefaults_MutatingWebhook)."""
    for hook in obj.get("webhooks") or []:
        if not isinstance(hook, dict):
            continue
        hook.setdefault("failurePolicy", "Fail")
        hook.setdefault("matchPolicy", "Equivalent")
        hook.setdefault("namespaceSelector", {})
        hook.setdefault("objectSelector", {})
        hook.setdefault("timeoutSeconds", 10)
        hook.setdefault("reinvocationPolicy", "Never")
        for rule in hook.get("rules") or []:
            if isinstance(rule, dict):
                rule.setdefault("scope", "*")
        service = (hook.get("clientConfig") or {}).get("service")
        if isinstance(service, dict):
            service.setdefault("port", 443)


def _validate_webhooks(obj: Obj) -> list[FieldError]:
    errors: list[FieldError] = []
    seen: set[str] = set()
    for index, hook in enumerate(obj.get("webhooks") or []):
        path = f"webhooks[{index}]"
        if not isinstance(hook, dict):
            errors.append(_invalid(path, hook, "must be an object"))
            continue
        name = str(hook.get("name") or "")
        if not name:
            errors.append(_required(f"{path}.name"))
        elif name.count(".") < 2:
            errors.append(_invalid(f"{path}.name", name,
                                   "should be a domain with at least three segments "
                                   "separated by dots"))
        elif name in seen:
            errors.append(_duplicate(f"{path}.name", name))
        seen.add(name)
        side_effects = hook.get("sideEffects")
        if side_effects is None:
            errors.append(_required(f"{path}.sideEffects",
                                    "must specify one of None, NoneOnDryRun"))
        elif side_effects not in ("None", "NoneOnDryRun"):
            errors.append(_not_supported(f"{path}.sideEffects", side_effects,
                                         ["None", "NoneOnDryRun"]))
        if not hook.get("admissionReviewVersions"):
            errors.append(_required(f"{path}.admissionReviewVersions",
                                    "must specify one of v1, v1beta1"))
        if hook.get("failurePolicy") not in ("Ignore", "Fail"):
            errors.append(_not_supported(f"{path}.failurePolicy", hook.get("failurePolicy"),
                                         ["Fail", "Ignore"]))
        timeout = hook.get("timeoutSeconds")
        if not isinstance(timeout, int) or not 1 <= timeout <= 30:
            errors.append(_invalid(f"{path}.timeoutSeconds", timeout,
                                   "the timeout value must be between 1 and 30 seconds"))
        config = hook.get("clientConfig") or {}
        if ("url" in config) == ("service" in config):
            errors.append(_required(f"{path}.clientConfig",
                                    "exactly one of url or service is required"))
        if "caBundle" in config:
            _decode(config["caBundle"], f"WebhookClientConfig.caBundle of {path}")
    return errors
