"""The bounds Envoy puts on what a mesh says, as constrained types for the models.

Anything the models accept, Envoy 1.40 accepts (tests/test_mesh_properties.py proves it
with ``envoy --mode validate``). Integers are strict (``port: true`` is an error, not
port 1), every integer Envoy keeps in a uint32 is at most 2^32-1, and every string that
ends up in a header, a name or a body is bounded and free of the characters Envoy
forbids there (NUL, CR, LF), so one bad value is an error naming its field instead of a
route table every sidecar rejects.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Final

from pydantic import AfterValidator, Field, Strict

UINT32_MAX: Final = 2**32 - 1
MAX_HEADER_VALUE: Final = 4096  # bytes; Envoy's default max request headers are 60 KiB
MAX_BODY: Final = 64 * 1024  # a fallback answer, held in every sidecar's route table
MAX_PATH: Final = 1024
MAX_LABEL_VALUE: Final = 63  # Kubernetes' label value (and name) limit
MAX_LABEL_PREFIX: Final = 253

# RFC 9110 token characters: what a header name may be (HTTP/2 sends it lower-cased).
TOKEN: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Kubernetes label values and key names: alphanumerics, '-', '_', '.', starting and
# ending alphanumeric (a value may be empty).
_LABEL_NAME: Final = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN: Final = re.compile(
    r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$"
)
_FORBIDDEN_IN_VALUES: Final = ("\x00", "\r", "\n")

Int = Annotated[int, Strict()]
Port = Annotated[int, Strict(), Field(ge=1, le=65535)]
UInt32 = Annotated[int, Strict(), Field(ge=1, le=UINT32_MAX)]
Percent = Annotated[float, Strict(), Field(ge=0, le=100, allow_inf_nan=False)]


def header_name(value: str) -> str:
    if len(value) > 256 or not TOKEN.fullmatch(value):
        raise ValueError(
            f"header name {value[:40]!r} must be 1 to 256 token characters "
            "(letters, digits and !#$%&'*+-.^_`|~), no spaces, ':' or line breaks"
        )
    return value


def header_value(value: str) -> str:
    """What Envoy accepts in a header value: no NUL, CR or LF, and a sane size."""
    if any(c in value for c in _FORBIDDEN_IN_VALUES):
        raise ValueError(f"{value[:40]!r} holds a line break or NUL, which a header value "
                         "cannot; remove it")
    if len(value.encode()) > MAX_HEADER_VALUE:
        raise ValueError(f"is {len(value.encode())} bytes; at most {MAX_HEADER_VALUE}")
    return value


def label_key(value: str) -> str:
    """A Kubernetes label key: ``[prefix/]name``, the prefix a DNS subdomain."""
    prefix, _, name = value.rpartition("/")
    if (prefix and (len(prefix) > MAX_LABEL_PREFIX or not _DNS_SUBDOMAIN.fullmatch(prefix))) or (
        len(name) > MAX_LABEL_VALUE or not _LABEL_NAME.fullmatch(name)
    ):
        raise ValueError(
            f"label key {value[:80]!r} must be a Kubernetes label key: an optional DNS "
            "prefix and '/', then at most 63 letters, digits, '-', '_' or '.', starting "
            "and ending with a letter or digit"
        )
    return value


def label_value(value: str) -> str:
    if value and (len(value) > MAX_LABEL_VALUE or not _LABEL_NAME.fullmatch(value)):
        raise ValueError(
            f"label value {value[:80]!r} must be a Kubernetes label value: at most 63 "
            "letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        )
    return value


_OCTET: Final = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4: Final = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def ip_address(value: str) -> str:
    """An IPv4 or IPv6 address, as Envoy parses one (no zone index, no brackets, no
    leading zeros). IPv4 by a regular expression first: a mesh has many endpoints."""
    if _IPV4.fullmatch(value):
        return value
    try:
        parsed = ipaddress.ip_address(value)
    except ValueError:
        parsed = None
    if parsed is None or "%" in value:
        raise ValueError(
            f"address {value[:80]!r} is not an IP address (such as 10.0.0.7 or fd00::7); "
            "for a DNS name, add address_type: dns to the endpoint"
        )
    return value


def hostname(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValueError(
            f"address {value[:80]!r} must be a lower-case DNS name such as "
            "'db.example.com' (address_type: dns)"
        )
    return value


HeaderName = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(header_name)]
HeaderValue = Annotated[str, Field(max_length=MAX_HEADER_VALUE), AfterValidator(header_value)]
LabelKey = Annotated[str, AfterValidator(label_key)]
LabelValue = Annotated[str, AfterValidator(label_value)]
Labels = dict[LabelKey, LabelValue]

_DNS_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def dns_label(value: str, what: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        raise ValueError(
            f"{what} {value[:80]!r} must be a DNS label: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return value
