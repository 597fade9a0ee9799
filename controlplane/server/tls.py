"""xDS over TLS: a serving certificate from the mesh CA, renewed without a restart.

gRPC asks ``fetch`` before each new connection's handshake (on its own thread): it gets
a new configuration once half the certificate's life has passed or the CA changed (a
rotated root), else None (keep the current one). Sidecars trust the CA's bundle
(``controlplane bootstrap --xds-ca``), so a renewed certificate needs nothing from them.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

import grpc
import structlog

from controlplane.security.ca import CertificateAuthority, Issued

log = structlog.get_logger("controlplane.xds")

SERVER_CERT_TTL = timedelta(days=7)
LOOPBACK = ("localhost", "127.0.0.1")


def server_names(namespace: str, extra: Iterable[str] = (), service: str = "controlplane",
                 ) -> tuple[list[str], list[str]]:
    """(DNS names, IPs) the xDS certificate is for: the Service's names in ``namespace``,
    loopback, and ``extra`` (``--xds-server-name``, and the address it listens on)."""
    dns = [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
           f"{service}.{namespace}.svc.cluster.local"]
    ips: list[str] = []
    for name in (*LOOPBACK, *extra):
        name = name.strip("[]")
        if not name or name in ("0.0.0.0", "::"):
            continue
        try:
            ip = str(ipaddress.ip_address(name))
        except ValueError:
            if name not in dns:
                dns.append(name)
            continue
        if ip not in ips:
            ips.append(ip)
    return dns, ips


class ServingCertificate:
    """The xDS server's certificate, issued by the CA ``ca()`` returns now."""

    def __init__(self, ca: Callable[[], CertificateAuthority], dns: list[str], ips: list[str],
                 ttl: timedelta = SERVER_CERT_TTL,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._ca = ca
        self.dns, self.ips = dns, ips
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self.issued, self._ca_version = self._issue()

    def _issue(self) -> tuple[Issued, str]:
        ca = self._ca()
        issued = ca.issue_server(self.dns, self.ips, self._clock(), self.ttl)
        log.info("xds.tls_certificate", serial=f"{issued.serial:x}",
                 not_after=issued.not_after.isoformat(), dns=self.dns, ips=self.ips)
        return issued, ca.version

    def _config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.issued.key_pem, self.issued.cert_pem)])

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._config(), self.fetch)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the certificate is due or the CA changed; else None."""
        try:
            with self._lock:
                fresh = self._clock() < self.issued.rotate_at(0.5)
                if fresh and self._ca().version == self._ca_version:
                    return None
                self.issued, self._ca_version = self._issue()
                return self._config()
        except Exception:  # gRPC would drop the handshake: keep serving the current one
            log.exception("xds.tls_renewal_failed",
                          hint="the current certificate is kept; retried at the next "
                          "connection")
            return None
