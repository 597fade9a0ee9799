"""RFC 6902 JSON Patch from one object to another: what a mutating webhook answers.

Small by construction: objects are diffed member by member; a list that only gained
items at its front or back gets ``add`` operations (injection puts its containers
first), any other changed list is replaced whole, which is always correct.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Op = dict[str, Any]


def json_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[Op]:
    """The operations that turn ``before`` into ``after`` (both JSON-like)."""
    ops: list[Op] = []
    _diff(before, after, "", ops)
    return ops


def pointer(*tokens: str | int) -> str:
    """An RFC 6901 JSON Pointer (``~`` and ``/`` in keys escaped as ``~0`` and ``~1``)."""
    return "".join("/" + str(token).replace("~", "~0").replace("/", "~1")
                   for token in tokens)


def _diff(before: Any, after: Any, path: str, ops: list[Op]) -> None:
    if _same(before, after):
        return
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        for key in before:
            if key not in after:
                ops.append({"op": "remove", "path": path + pointer(key)})
        for key, value in after.items():
            if key in before:
                _diff(before[key], value, path + pointer(key), ops)
            else:
                ops.append({"op": "add", "path": path + pointer(key), "value": value})
        return
    if isinstance(before, list) and isinstance(after, list) and len(after) > len(before):
        grown = len(after) - len(before)
        if all(_same(a, b) for a, b in zip(before, after[grown:], strict=True)):
            for index, value in enumerate(after[:grown]):
                ops.append({"op": "add", "path": f"{path}/{index}", "value": value})
            return
        if all(_same(a, b) for a, b in zip(before, after, strict=False)):
            for value in after[len(before):]:
                ops.append({"op": "add", "path": f"{path}/-", "value": value})
            return
    ops.append({"op": "replace", "path": path, "value": after})


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON: ``True`` is not ``1`` there, though Python says it is."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
