"""Writes over HTTP: create, update and patch, with field validation and warnings.

Part of the API server double (tests/kube/apiserver.py).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from tests.kube.admission import (
    _prune,
)
from tests.kube.constants import (
    Obj,
)
from tests.kube.errors import (
    _error,
)
from tests.kube.negotiation import (
    _Output,
    _represent,
)
from tests.kube.routing import _Target
from tests.kube.storage import (
    _Store,
)
from tests.kube.wire import (
    json_patch,
    merge_patch,
)


class _Writes:
    """The HTTP handlers that write: POST, PUT and PATCH (merge or JSON patch)."""

    _store: _Store

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
        if not kind.namespaced:
            meta.pop("namespace", None)  # the real server clears it on cluster-scoped kinds
        elif meta.get("namespace", target.namespace) != target.namespace:
            raise _error(400, "the namespace of the provided object does not match the "
                         "namespace sent on the request")
        else:
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
        assert target.name is not None
        if request.method == "PUT":
            body = self._check_body(await self._body(request), target)
        else:
            body = self._check_body(
                self._patched(request, await self._body(request),
                              self._store.get(target.kind, target.namespace or "",
                                              target.name)),
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
        schema = self._store.crd_schemas.get(target.kind)
        if request.query.get("fieldValidation") != "Strict" or schema is None:
            return body
        pruned: list[str] = []
        _prune({k: v for k, v in body.items() if k != "metadata"}, schema, "",
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
