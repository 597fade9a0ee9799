"""Waiting on the Kubernetes source and the API server double: the next mesh that passes
a check, and an object's status conditions once they are as wanted (bounded in time)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from controlplane.mesh.model import Mesh
from controlplane.sources.kubernetes.kinds import Kind
from tests.kube.apiserver import ApiServerDouble
from tests.test_kube_source import Feed, next_mesh

Obj = dict[str, Any]


async def mesh_where(feed: Feed, check: Callable[[Mesh], bool], timeout: float = 15) -> Mesh:
    deadline = time.monotonic() + timeout
    while True:
        mesh = await next_mesh(feed, max(0.1, deadline - time.monotonic()))
        if check(mesh):
            return mesh


async def status_of(api: ApiServerDouble, kind: Kind, namespace: str, name: str,
                    wanted: Callable[[list[Obj]], bool], timeout: float = 15) -> list[Obj]:
    deadline = time.monotonic() + timeout
    while True:
        found = (api.get(kind, namespace, name).get("status") or {}).get("conditions") or []
        if wanted(found):
            return list(found)
        assert time.monotonic() < deadline, f"status never as wanted: {found}"
        await asyncio.sleep(0.05)
