"""What a Gateway API route rule matches: path, headers, query parameters, method
(HTTPRoute), and a gRPC service/method (GRPCRoute). The spec's field names (camelCase,
``populate_by_name`` so a dump in snake_case loads too) and its bounds."""

from __future__ import annotations

import math
import re
import re._constants as _c
import re._parser as _parser
import warnings
from typing import Any, Final, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from controlplane.mesh.base import _Model
from controlplane.mesh.limits import MAX_PATH, HeaderName, HeaderValue

MAX_MATCHES: Final = 64  # per rule (standard channel)
MAX_HEADER_MATCHES: Final = 16  # headers, queryParams per match
MAX_REGEX: Final = 1024
MAX_GRPC_NAME: Final = 1024
# Envoy's RE2 refuses a pattern whose program exceeds 100 instructions (its runtime
# re2.max_program_size.error_level); four are the match's own.
MAX_PROGRAM: Final = 96
_MARGIN: Final = 1.25
_ANY_PART: Final = "[^/]+"
_NOT_RE2: Final = ("(?=", "(?!", "(?<=", "(?<!", "(?>", "(?P=", "(?(", "\\Z")
_GRPC_SERVICE: Final = re.compile(r"^\.?[A-Za-z_][A-Za-z_0-9]*(\.[A-Za-z_][A-Za-z_0-9]*)*$")
_GRPC_METHOD: Final = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")

HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                     "PATCH"]


class _GatewayModel(_Model):
    """A Gateway API object's part: its camelCase names, or snake_case ones."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              alias_generator=to_camel, serialize_by_alias=True)


def regex(value: str) -> str:
    """RE2 and Python agree on the syntax people use; a pattern Python cannot compile,
    one using what RE2 lacks, or one bigger than Envoy lets RE2 compile is refused here,
    by path, rather than by every sidecar (one bad pattern fails the whole table)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "possible nested set": valid in RE2 too
            parsed = _parser.parse(value)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"regular expression {value[:80]!r} does not compile ({exc}); "
                         "fix the pattern") from None
    if any(part in value for part in _NOT_RE2) or re.search(r"\\[1-9]|[*+?}]\+", value):
        raise ValueError(f"regular expression {value[:80]!r} uses a look-around, a back "
                         "reference, an atomic group, a possessive quantifier or \\Z, "
                         "which Envoy's RE2 does not support; rewrite it")
    size = math.ceil(_program_size(parsed) * _MARGIN)
    if size > MAX_PROGRAM:
        raise ValueError(
            f"regular expression {value[:80]!r} is too big for Envoy: about {size} RE2 "
            f"instructions, and Envoy refuses a pattern over {MAX_PROGRAM + 4}; shorten it "
            "(fewer alternatives, smaller {n} repetitions)")
    return value


def _program_size(parsed: Any) -> int:
    """An estimate of RE2's program size, measured against Envoy 1.40: a literal, an
    anchor or a simple class 1 instruction, ``.`` and a negated class 2, a capturing
    group 2 more, an alternative 1, a loop 1, an optional copy its own size plus 1."""
    total = 0
    for op, arg in parsed:
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            low, high, sub = arg
            inner = _program_size(sub)
            if high == _c.MAXREPEAT:  # x* or x{n,}: n copies, then a loop
                total += inner * max(low, 1) + 1
            else:  # x{n,m}: n copies, then m - n optional ones
                total += inner * low + (inner + 1) * (high - low)
        elif op == _c.SUBPATTERN:
            total += (2 if arg[0] is not None else 0) + _program_size(arg[-1])
        elif op == _c.BRANCH:
            total += sum(_program_size(b) for b in arg[1]) + len(arg[1]) - 1
        elif op in (_c.ANY, _c.NOT_LITERAL):  # any byte sequence of a UTF-8 character
            total += 2
        elif op == _c.IN:
            negated = any(item[0] == _c.NEGATE for item in arg)
            total += max(len(arg) - negated, 1) + negated
        else:
            total += 1
        if total > MAX_PROGRAM * 10:  # far past the limit: stop counting
            break
    return total


def program_size(value: str) -> int:
    """The estimate with a margin (RE2 sometimes needs more than the sum of the parts),
    for a pattern that parses."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return math.ceil(_program_size(_parser.parse(value)) * _MARGIN)


class PathMatch(_GatewayModel):
    """``PathPrefix`` matches whole segments: ``/foo`` takes ``/foo`` and ``/foo/bar``,
    never ``/foobar``; a trailing ``/`` in the value is ignored."""

    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: str = Field(default="/", min_length=1, max_length=MAX_PATH)

    @model_validator(mode="after")
    def _path(self) -> PathMatch:
        if self.type == "RegularExpression":
            regex(self.value)
        elif not self.value.startswith("/") or any(c in self.value for c in " \t\r\n\x00?#"):
            raise ValueError(f"path {self.value[:80]!r} must start with '/' and hold no "
                             "spaces, '?' or '#' (the query string is matched by queryParams)")
        elif "//" in self.value or "/./" in self.value or "/../" in self.value \
                or self.value.endswith(("/.", "/..")):
            raise ValueError(f"path {self.value[:80]!r} is not normalized ('//', '/./' or "
                             "'/../'); write the path a request would carry")
        return self


class HeaderMatch(_GatewayModel):
    """A header's value: ``Exact`` or ``RegularExpression``. Names are case-insensitive."""

    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: HeaderName
    value: HeaderValue

    @model_validator(mode="after")
    def _value(self) -> HeaderMatch:
        if self.type == "RegularExpression":
            if not self.value:
                raise ValueError("a RegularExpression value cannot be empty; write '.*' to "
                                 "match any value")
            regex(self.value)
        return self


class QueryParamMatch(_GatewayModel):
    """A query parameter's value (names are case-sensitive)."""

    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
    value: str = Field(min_length=1, max_length=1024)

    @model_validator(mode="after")
    def _value(self) -> QueryParamMatch:
        if self.type == "RegularExpression":
            regex(self.value)
        elif any(c in self.value for c in "\x00\r\n"):
            raise ValueError("a query parameter value holds no line break or NUL")
        return self


def _unique_names(items: list[Any] | None, what: str, fold: bool) -> None:
    """The spec: with the same name twice, only the first counts; we refuse the second,
    which a reader would think applies too."""
    seen: set[str] = set()
    for item in items or ():
        name = item.name.lower() if fold else item.name
        if name in seen:
            raise ValueError(f"{what} {item.name!r} is matched twice; match each name once")
        seen.add(name)


class HTTPRouteMatch(_GatewayModel):
    """Every condition given must hold. No ``path``: every path (``PathPrefix /``)."""

    path: PathMatch | None = None
    headers: list[HeaderMatch] | None = Field(default=None, max_length=MAX_HEADER_MATCHES)
    query_params: list[QueryParamMatch] | None = Field(default=None,
                                                       max_length=MAX_HEADER_MATCHES)
    method: HttpMethod | None = None

    @model_validator(mode="after")
    def _names(self) -> HTTPRouteMatch:
        _unique_names(self.headers, "header", fold=True)
        _unique_names(self.query_params, "query parameter", fold=False)
        return self

    @property
    def path_or_default(self) -> PathMatch:
        return self.path or PathMatch()


class GRPCMethodMatch(_GatewayModel):
    """``service`` (``ratings.v1.Ratings``) and/or ``method`` (``Get``); at least one.
    ``RegularExpression`` matches each given part as a pattern."""

    type: Literal["Exact", "RegularExpression"] = "Exact"
    service: str | None = Field(default=None, min_length=1, max_length=MAX_GRPC_NAME)
    method: str | None = Field(default=None, min_length=1, max_length=MAX_GRPC_NAME)

    @model_validator(mode="after")
    def _parts(self) -> GRPCMethodMatch:
        if self.service is None and self.method is None:
            raise ValueError("give service, method or both")
        for part, pattern in ((self.service, _GRPC_SERVICE), (self.method, _GRPC_METHOD)):
            if part is None:
                continue
            if self.type == "RegularExpression":
                regex(part)
            elif not pattern.fullmatch(part):
                raise ValueError(f"{part[:80]!r} is not a gRPC service or method name "
                                 "(such as ratings.v1.Ratings and Get)")
        found = self.path_regex()
        if found is not None:
            try:
                regex(found)  # what Envoy gets must fit RE2's limits too
            except ValueError as exc:
                raise ValueError(f"the path pattern this match becomes: {exc}; give service "
                                 "too (an exact path), or a shorter pattern") from None
        return self

    def path_regex(self) -> str | None:
        """The RE2 the path must match, when a plain path or prefix cannot say it: a
        method of any service, or ``RegularExpression`` parts."""
        if self.type == "Exact" and self.service is not None:
            return None
        if self.type == "Exact":
            return f"/{_ANY_PART}/{re.escape(self.method or '')}"
        return f"/{self.service or _ANY_PART}/{self.method or _ANY_PART}"


class GRPCRouteMatch(_GatewayModel):
    """No ``method``: every method of the service."""

    method: GRPCMethodMatch | None = None
    headers: list[HeaderMatch] | None = Field(default=None, max_length=MAX_HEADER_MATCHES)

    @model_validator(mode="after")
    def _names(self) -> GRPCRouteMatch:
        _unique_names(self.headers, "header", fold=True)
        return self
