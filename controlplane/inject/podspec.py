"""Checks on a pod's spec that both injections (sidecar and proxyless) make before they add
to it: the lists they extend must be lists, and no name they add may already be taken."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from controlplane.inject.config import InjectError


def containers(spec: Mapping[str, Any], key: str, required: bool, ours: Collection[str],
               injection: str) -> list[dict[str, Any]]:
    """The list at ``spec[key]``: named objects, none named as one of ``ours`` (the
    containers ``injection`` adds, named in the error)."""
    value = spec.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise InjectError(f"spec.{key}", "missing or empty; a pod needs at least one "
                          "container: give it one" if required
                          else "not a list; give a list of containers")
    for index, container in enumerate(value):
        where = f"spec.{key}[{index}]"
        if not isinstance(container, dict) or not isinstance(container.get("name"), str):
            raise InjectError(where, "a container must be an object with a name")
        if container["name"] in ours:
            raise InjectError(f"{where}.name", f"{container['name']!r} is the name of a "
                              f"container {injection} adds; rename this container")
    return value


def volumes(spec: Mapping[str, Any], ours: Collection[str], what: str) -> list[Any]:
    """The pod's volumes: a list, none named as one of ``ours`` (``what`` says whose)."""
    value = spec.get("volumes")
    if value is None:
        return []
    if not isinstance(value, list):
        raise InjectError("spec.volumes", "must be a list of volumes")
    for index, volume in enumerate(value):
        if isinstance(volume, Mapping) and volume.get("name") in ours:
            raise InjectError(f"spec.volumes[{index}].name",
                              f"{volume.get('name')!r} is the name of {what}; rename this "
                              "volume")
    return value
