"""Names that tie a gateway's resources together."""

from __future__ import annotations

from typing import Final

CERTIFICATE_PREFIX: Final = "certificate/"  # SDS: a listener's certificate, per stream


def certificate_secret(namespace: str, name: str) -> str:
    """The SDS secret name of the certificate ``namespace/name`` (a Secret, or a
    ``certificates`` entry). Answered per stream to the gateway's proxies only."""
    return f"{CERTIFICATE_PREFIX}{namespace}/{name}"


def certificate_of(secret: str) -> tuple[str, str] | None:
    """(namespace, name) of a certificate's secret name; None for any other secret."""
    if not secret.startswith(CERTIFICATE_PREFIX):
        return None
    namespace, sep, name = secret[len(CERTIFICATE_PREFIX):].partition("/")
    return (namespace, name) if sep and namespace and name and "/" not in name else None


def listener(port: int) -> str:
    """A gateway proxy's listener on ``port`` (every Gateway listener on that port)."""
    return f"gateway/{port}"


def route(port: int, section: str = "") -> str:
    """The route table of an HTTP port, or of one HTTPS listener (``section``) on it."""
    return f"gateway/{port}/{section}" if section else f"gateway/{port}"
