"""A service's policy: traffic (split, match routes), fallback, and the resilience
policies of ``resilience.py``. Every field is optional (DESIGN.md section 3)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Final

from pydantic import Field, field_validator, model_validator

from controlplane.mesh.base import _Model
from controlplane.mesh.duration import Duration
from controlplane.mesh.limits import (
    MAX_BODY,
    MAX_PATH,
    HeaderValue,
    Int,
    Labels,
    dns_label,
    header_name,
)
from controlplane.mesh.resilience import (
    CircuitBreaker,
    Fault,
    LoadBalancer,
    OutlierDetection,
    RateLimit,
    Retries,
)

MAX_ROUTES = 100  # split legs, match routes: far more than a policy needs, and bounded
# Envoy keeps connect and idle timeouts in whole milliseconds: 500us would become 0,
# an instant connect failure or (idle) no timeout at all.
MIN_CONNECTION_TIMEOUT: Final = timedelta(milliseconds=1)


class SplitTarget(_Model):
    """One leg of a traffic split: a label subset of this service's endpoints
    (``labels``), or another service (``service``, in this service's namespace unless
    ``namespace`` says otherwise). Weights are relative: 90/10 and 9/1 split alike."""

    labels: Labels | None = Field(default=None, min_length=1)
    service: str | None = None
    namespace: str | None = None
    weight: Annotated[Int, Field(ge=0, le=10000)]

    @model_validator(mode="after")
    def _one_target(self) -> SplitTarget:
        _one_target(self.labels, self.service, self.namespace)
        return self


class Fallback(_Model):
    """What callers get instead of a bare 503 when no endpoint of the service is healthy
    (all not ready, or all ejected): a fixed answer (``status``, ``body``,
    ``content_type``) or another ``service`` (``name`` in this namespace, or
    ``name.namespace``) answering in its place. ``status`` defaults to 200 in both
    forms (the service form answers with the fallback service's body and headers)."""

    status: Annotated[Int, Field(ge=200, le=599)] | None = None
    body: str | None = Field(default=None, max_length=MAX_BODY)
    content_type: HeaderValue | None = Field(default=None, min_length=1)
    service: str | None = None

    @field_validator("body")
    @classmethod
    def _body(cls, value: str | None) -> str | None:
        if value is not None and len(value.encode()) > MAX_BODY:
            raise ValueError(f"the body is {len(value.encode())} bytes; at most {MAX_BODY}")
        return value

    @field_validator("service")
    @classmethod
    def _service(cls, value: str | None) -> str | None:
        if value is not None:
            parts = value.split(".")
            if len(parts) > 2:
                raise ValueError(
                    f"service {value[:80]!r}: give name or name.namespace"
                )
            for part in parts:
                dns_label(part, "service")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> Fallback:
        static = [k for k in ("body", "content_type") if getattr(self, k) is not None]
        if self.service is not None and static:
            raise ValueError(
                f"give service (another service answers) or body/content_type "
                f"(a fixed answer), not both; found service and {', '.join(static)}"
            )
        if self.service is None and not static and self.status is None:
            raise ValueError("give service, or a fixed answer: status, body, content_type")
        return self

    def target(self, namespace: str) -> tuple[str, str] | None:
        """(name, namespace) of the fallback service, in ``namespace`` unless it says."""
        if self.service is None:
            return None
        name, _, other = self.service.partition(".")
        return name, other or namespace


def _one_target(labels: dict[str, str] | None, service: str | None, namespace: str | None) -> None:
    if (labels is None) == (service is None):
        raise ValueError(
            "give labels (a subset of this service's endpoints) or service (another "
            "service), exactly one of them"
        )
    if namespace is not None and service is None:
        raise ValueError("namespace: only with service")
    if service is not None:
        dns_label(service, "service")
    if namespace is not None:
        dns_label(namespace, "namespace")


class PathMatch(_Model):
    """The request path (without its query string): one ``prefix`` or one ``exact`` path.
    A prefix matches as Envoy's and Istio's do, character by character: ``/api`` also
    matches ``/apiary``; write ``/api/`` to mean the directory."""

    prefix: str | None = Field(default=None, max_length=MAX_PATH)
    exact: str | None = Field(default=None, max_length=MAX_PATH)

    @field_validator("prefix", "exact")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and (
            not value.startswith("/") or any(c in value for c in " \t\r\n\x00?#")
        ):
            raise ValueError(
                f"path {value[:80]!r} must start with '/' and hold no spaces, '?' or '#' "
                "(the query string is not matched)"
            )
        return value

    @model_validator(mode="after")
    def _one_form(self) -> PathMatch:
        if (self.prefix is None) == (self.exact is None):
            raise ValueError("give prefix or exact, exactly one of them")
        return self


class MatchRoute(_Model):
    """Requests whose headers all have exactly these values, and whose path matches
    ``path`` when given, go to ``labels`` (a subset of this service's endpoints) or
    ``service``, ahead of the split or default route."""

    headers: dict[str, HeaderValue] | None = Field(default=None, min_length=1, max_length=32)
    path: PathMatch | None = None
    labels: Labels | None = Field(default=None, min_length=1)
    service: str | None = None
    namespace: str | None = None

    @field_validator("headers")
    @classmethod
    def _header_names(cls, headers: dict[str, str] | None) -> dict[str, str] | None:
        for name in headers or {}:
            if name != name.lower() or name.startswith(":"):
                raise ValueError(
                    f"header name {name[:40]!r} must be lower-case, not a pseudo-header "
                    "(such as :path, which is not matched)"
                )
            header_name(name)
        return headers

    @model_validator(mode="after")
    def _one_target(self) -> MatchRoute:
        if self.headers is None and self.path is None:
            raise ValueError("give headers, path or both: what requests this route takes")
        _one_target(self.labels, self.service, self.namespace)
        return self


class Policy(_Model):
    """Service governance for one service; every field optional (DESIGN.md section 3)."""

    timeout: Duration | None = None
    connect_timeout: Duration | None = Field(default=None, description=(
        "How long a new connection to one of its endpoints may take, such as 250ms "
        "(default 1s)."))
    idle_timeout: Duration | None = Field(default=None, description=(
        "A TCP connection to it through a captured sidecar is closed after this long "
        "without a byte either way (default 1h; 0s: never). HTTP ports are not affected."))
    retries: Retries | None = None
    circuit_breaker: CircuitBreaker | None = None
    outlier_detection: OutlierDetection | None = None
    load_balancer: LoadBalancer | None = None
    split: list[SplitTarget] | None = Field(default=None, max_length=MAX_ROUTES)
    match: list[MatchRoute] | None = Field(default=None, max_length=MAX_ROUTES)
    fault: Fault | None = None
    rate_limit: RateLimit | None = None
    fallback: Fallback | None = None

    @field_validator("connect_timeout")
    @classmethod
    def _connect_timeout(cls, value: timedelta | None) -> timedelta | None:
        """Istio's connectionPool.tcp.connectTimeout: Envoy refuses 0."""
        if value is not None and value < MIN_CONNECTION_TIMEOUT:
            raise ValueError(
                "must be at least 1ms, such as '250ms' (how long a new connection to an "
                "endpoint may take); leave it out for the default, 1s"
            )
        return value

    @field_validator("idle_timeout")
    @classmethod
    def _idle_timeout(cls, value: timedelta | None) -> timedelta | None:
        """Istio's connectionPool.tcp.idleTimeout; 0 means never, as in Envoy."""
        if value is not None and timedelta(0) < value < MIN_CONNECTION_TIMEOUT:
            raise ValueError(
                "must be 0 (never close an idle connection) or at least 1ms, such as "
                "'30s'; leave it out for the default, 1h"
            )
        return value

    @field_validator("split")
    @classmethod
    def _split_has_weight(cls, split: list[SplitTarget] | None) -> list[SplitTarget] | None:
        if split is not None and split and sum(t.weight for t in split) == 0:
            raise ValueError("split weights add up to 0; give at least one target a weight")
        return split
