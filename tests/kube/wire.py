"""Label and field selectors, merge and JSON patches: the request-side languages of
the API, as kube-apiserver parses them.

Part of the API server double (tests/kube/apiserver.py).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from tests.kube.constants import (
    Obj,
)
from tests.kube.errors import (
    _error,
)

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


