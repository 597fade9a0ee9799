"""Gateway API route filters (header modifiers, redirect, URL rewrite, mirror), and the
backend reference a mirror (and a backendRef) names. Types this mesh does not implement
(``ExtensionRef``, ``CORS``, ``ExternalAuth``) are accepted by the model, as the API
server accepts them, and refused by attachment: the route is left out with
``Accepted: False, UnsupportedValue`` on its status, the rest of the mesh is served."""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, Field, model_validator

from controlplane.mesh.limits import MAX_PATH, HeaderName, HeaderValue, Int, Port, dns_label
from controlplane.mesh.route_match import _GatewayModel, regex

MAX_FILTERS: Final = 16
MAX_HEADER_CHANGES: Final = 16
SUPPORTED: Final = frozenset({"RequestHeaderModifier", "ResponseHeaderModifier",
                              "RequestRedirect", "URLRewrite", "RequestMirror"})
_HOSTNAME: Final = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
CORE: Final = ""  # the core API group: Service
GATEWAY_GROUP: Final = "gateway.networking.k8s.io"


def precise_hostname(value: str) -> str:
    if len(value) > 253 or not _HOSTNAME.fullmatch(value):
        raise ValueError(f"hostname {value[:80]!r} must be a lower-case DNS name such as "
                         "'shop.example.com' (no wildcard, no port)")
    return value


Hostname = Annotated[str, AfterValidator(precise_hostname)]
Name = Annotated[str, Field(min_length=1, max_length=253)]
Namespace = Annotated[str, AfterValidator(lambda v: dns_label(v, "namespace"))]
Group = Annotated[str, Field(max_length=253, pattern=r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?"
                                                     r"(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")]
Kind = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-zA-Z]([-a-zA-Z0-9]*"
                                                                 r"[a-zA-Z0-9])?$")]


class BackendObjectRef(_GatewayModel):
    """A Service (group ``""``, kind ``Service``, the defaults) and its port; in the
    route's namespace unless ``namespace`` says (then a ReferenceGrant must allow it)."""

    group: Group = CORE
    kind: Kind = "Service"
    name: Name
    namespace: Namespace | None = None
    port: Port | None = None

    def namespace_or(self, default: str) -> str:
        return self.namespace or default


class HeaderChange(_GatewayModel):
    name: HeaderName
    value: HeaderValue


class HeaderModifier(_GatewayModel):
    """``set`` replaces, ``add`` appends, ``remove`` drops (by name, case-insensitive)."""

    set: list[HeaderChange] | None = Field(default=None, max_length=MAX_HEADER_CHANGES)
    add: list[HeaderChange] | None = Field(default=None, max_length=MAX_HEADER_CHANGES)
    remove: list[HeaderName] | None = Field(default=None, max_length=MAX_HEADER_CHANGES)

    @model_validator(mode="after")
    def _once_each(self) -> HeaderModifier:
        for field in ("set", "add"):
            names = [change.name.lower() for change in getattr(self, field) or ()]
            if len(set(names)) != len(names):
                raise ValueError(f"{field} names a header twice; name each once")
        removed = [name.lower() for name in self.remove or ()]
        if len(set(removed)) != len(removed):
            raise ValueError("remove names a header twice; name each once")
        return self


class PathModifier(_GatewayModel):
    type: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    replace_full_path: str | None = Field(default=None, max_length=MAX_PATH)
    replace_prefix_match: str | None = Field(default=None, max_length=MAX_PATH)

    @model_validator(mode="after")
    def _one(self) -> PathModifier:
        full = self.type == "ReplaceFullPath"
        value, other = ((self.replace_full_path, self.replace_prefix_match) if full
                        else (self.replace_prefix_match, self.replace_full_path))
        field = "replaceFullPath" if full else "replacePrefixMatch"
        if value is None or other is not None:
            raise ValueError(f"type {self.type} takes {field}, and only that")
        if not value.startswith("/") or any(c in value for c in " \t\r\n\x00?#"):
            raise ValueError(f"{field} {value[:80]!r} must start with '/' and hold no "
                             "spaces, '?' or '#'")
        return self

    @property
    def value(self) -> str:
        found = self.replace_full_path or self.replace_prefix_match
        assert found is not None  # the validator demands one
        return found


def strip_prefix_pattern(prefix: str) -> str:
    """The RE2 a ReplacePrefixMatch ending in ``/`` rewrites with: the matched prefix
    (``/`` trimmed) and the slashes after it."""
    return f"^{re.escape(prefix.rstrip('/'))}/*"


def check_prefix_rewrite(prefix: str, replacement: str) -> None:
    """A prefix rewritten to a value ending in ``/`` becomes a regular expression of
    the prefix, which must fit RE2's limits like any other."""
    if replacement.endswith("/") or not prefix.rstrip("/"):
        try:
            regex(strip_prefix_pattern(prefix))
        except ValueError as exc:
            raise ValueError(f"the path prefix {prefix[:80]!r} is too long to replace with "
                             f"{replacement[:80]!r} ({exc}); match a shorter prefix") from None


class RequestRedirect(_GatewayModel):
    scheme: Literal["http", "https"] | None = None
    hostname: Hostname | None = None
    path: PathModifier | None = None
    port: Port | None = None
    status_code: Literal[301, 302, 303, 307, 308] = 302


class URLRewrite(_GatewayModel):
    hostname: Hostname | None = None
    path: PathModifier | None = None


class Fraction(_GatewayModel):
    numerator: Annotated[Int, Field(ge=0)]
    denominator: Annotated[Int, Field(ge=1)] = 100

    @model_validator(mode="after")
    def _at_most_one(self) -> Fraction:
        if self.numerator > self.denominator:
            raise ValueError("numerator must not exceed denominator")
        return self


class RequestMirror(_GatewayModel):
    """A copy of each request (or ``percent``/``fraction`` of them) to ``backendRef``;
    its answer is dropped."""

    backend_ref: BackendObjectRef
    percent: Annotated[Int, Field(ge=0, le=100)] | None = None
    fraction: Fraction | None = None

    @model_validator(mode="after")
    def _one_share(self) -> RequestMirror:
        if self.percent is not None and self.fraction is not None:
            raise ValueError("give percent or fraction, not both")
        return self

    @property
    def share(self) -> tuple[int, int]:
        """(numerator, denominator) of the requests copied."""
        if self.fraction is not None:
            return self.fraction.numerator, self.fraction.denominator
        return (100 if self.percent is None else self.percent), 100


class RouteFilter(_GatewayModel):
    """One filter: ``type`` and the field of that name (lower-camel) holding its
    settings. Unsupported types are kept so that attachment can report them."""

    type: Literal["RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect",
                  "URLRewrite", "RequestMirror", "ExtensionRef", "CORS", "ExternalAuth"]
    request_header_modifier: HeaderModifier | None = None
    response_header_modifier: HeaderModifier | None = None
    request_redirect: RequestRedirect | None = None
    url_rewrite: URLRewrite | None = None
    request_mirror: RequestMirror | None = None
    extension_ref: dict[str, Any] | None = Field(default=None, max_length=8)
    cors: dict[str, Any] | None = Field(default=None, max_length=16)
    external_auth: dict[str, Any] | None = Field(default=None, max_length=16)

    @model_validator(mode="after")
    def _matches_type(self) -> RouteFilter:
        wanted = _FIELD[self.type]
        given = [field for field in _FIELD.values() if getattr(self, field) is not None]
        if given != [wanted]:
            raise ValueError(f"type {self.type} takes the field {_ALIAS[wanted]}, and only "
                             f"that (found {', '.join(_ALIAS[f] for f in given) or 'none'})")
        return self


_FIELD: Final = {"RequestHeaderModifier": "request_header_modifier",
                 "ResponseHeaderModifier": "response_header_modifier",
                 "RequestRedirect": "request_redirect", "URLRewrite": "url_rewrite",
                 "RequestMirror": "request_mirror", "ExtensionRef": "extension_ref",
                 "CORS": "cors", "ExternalAuth": "external_auth"}
_ALIAS: Final = {"request_header_modifier": "requestHeaderModifier",
                 "response_header_modifier": "responseHeaderModifier",
                 "request_redirect": "requestRedirect", "url_rewrite": "urlRewrite",
                 "request_mirror": "requestMirror", "extension_ref": "extensionRef",
                 "cors": "cors", "external_auth": "externalAuth"}


def filter_problems(filters: list[RouteFilter] | None, grpc: bool = False) -> str | None:
    """The spec's rules for a list of filters, as one message (None: fine): each header
    modifier at most once; a redirect and a rewrite never together; gRPC routes take
    header modifiers and mirrors only."""
    types = [f.type for f in filters or ()]
    for once in ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect",
                 "URLRewrite"):
        if types.count(once) > 1:
            return f"{once} appears {types.count(once)} times; give it once"
    if "RequestRedirect" in types and "URLRewrite" in types:
        return "RequestRedirect and URLRewrite cannot be in one rule; use one of them"
    if grpc:
        allowed = {"RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror",
                   "ExtensionRef"}
        wrong = [t for t in types if t not in allowed]
        if wrong:
            return f"a GRPCRoute takes no {wrong[0]} filter (header modifiers, RequestMirror)"
    return None
