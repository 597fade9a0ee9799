"""The server's trust, set up from its settings: which CA it runs (a directory, the
operator's files, or the Kubernetes Secret shared by replicas), how it checks a proxy's
token (the CA's own tokens, or TokenReview), and the pieces that hang off it (SDS secrets,
xDS TLS). Apart from ``app.py`` so each stays readable; nothing else imports it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from controlplane.cache.cache import SnapshotCache
from controlplane.mesh.duration import parse_duration
from controlplane.security.authn import Authenticator, LocalTokens
from controlplane.security.ca import CertificateAuthority
from controlplane.security.castore import CaError
from controlplane.security.tokens import AUDIENCE
from controlplane.server.secured import Secured, secure
from controlplane.server.tls import server_names
from controlplane.settings import ServeSettings

log = structlog.get_logger("controlplane.serve")


def _ca_loader(settings: ServeSettings) -> tuple[Callable[[], CertificateAuthority], str]:
    """How to read the mesh CA (made on first read where the source allows), and where."""
    from controlplane.security.castore import load_dir, load_files, load_secret

    trust_domain = settings.trust_domain
    if settings.ca_mode() == "files":
        cert, key, bundle = settings.ca_cert, settings.ca_key, settings.ca_bundle
        if cert is None or key is None:
            raise ValueError("--ca-cert and --ca-key go together: give both (the CA's PEM "
                             "certificate and key), or use --ca-dir to have one made")
        return (lambda: load_files(cert, key, bundle)), f"files {cert}, {key}"
    if settings.ca_mode() == "dir":
        directory = settings.ca_dir
        assert directory is not None
        return (lambda: load_dir(directory, trust_domain, datetime.now(UTC))), \
            f"directory {directory}"
    from kubernetes import client as kube_client

    from controlplane.sources.kubernetes import api_client

    core = kube_client.CoreV1Api(api_client(settings.kubeconfig, pool_size=2))
    namespace, name = settings.webhook_namespace, settings.ca_secret
    return (lambda: load_secret(core, namespace, name, trust_domain,
                                        datetime.now(UTC))), f"Secret {namespace}/{name}"


# Waits before each new try at reading the CA Secret at start (about a minute in all): an
# API server blip must not crash-loop every replica.
_CA_RETRIES = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0)


async def _first_ca(load: Callable[[], CertificateAuthority], where: str,
                    retry: bool) -> CertificateAuthority:
    """The CA at start. From the API server (``retry``) a failed read is logged with its
    hint and tried again for about a minute; then, or at once for a file, the error ends
    the start as one line (the CLI prints a ValueError so)."""
    waits = list(_CA_RETRIES) if retry else []
    while True:
        try:
            return await asyncio.to_thread(load)
        except CaError as exc:
            if not waits:
                raise ValueError(str(exc)) from None
            wait = waits.pop(0)
            log.warning("serve.ca_unavailable", source=where, error=str(exc)[:300],
                        retry_in=wait, tries_left=len(waits) + 1)
            await asyncio.sleep(wait)


async def open_trust(settings: ServeSettings, cache: SnapshotCache) -> Secured | None:
    """The CA and what hangs off it, when one is configured (``ServeSettings.ca_mode``)."""
    if settings.ca_mode() is None:
        if settings.authentication == "token":
            raise ValueError("--authentication token needs a CA to check tokens against: "
                             "give --ca-dir DIR (made on first start) or --ca-cert/--ca-key")
        return None
    try:
        ttl = parse_duration(settings.workload_cert_ttl)
    except ValueError as exc:
        raise ValueError(f"--workload-cert-ttl: {exc}") from None
    load, where = _ca_loader(settings)
    ca = await _first_ca(load, where, retry=settings.source == "kubernetes")
    authenticator: Authenticator | None = None
    if settings.tokens_required():
        if settings.source == "kubernetes":
            from controlplane.security.tokenreview import TokenReviewAuthenticator
            from controlplane.sources.kubernetes import api_client

            authenticator = TokenReviewAuthenticator(
                api_client(settings.kubeconfig, pool_size=8), AUDIENCE, settings.trust_domain)
        else:
            authenticator = LocalTokens(lambda: secured.trust.current(), settings.trust_domain)
    else:
        log.warning("serve.unauthenticated", ca=where,
                    hint="--authentication none: any client may claim any identity and xDS "
                    "is plaintext; for development only")
    host = settings.xds_address.rpartition(":")[0]
    dns, ips = server_names(settings.webhook_namespace, [*settings.xds_server_name, host],
                            settings.webhook_service)
    secured = secure(cache, ca, load, where, settings.trust_domain, authenticator, ttl,
                     dns, ips)
    log.info("serve.identity", ca=where, trust_domain=settings.trust_domain,
             authentication="token" if authenticator is not None else "none",
             workload_cert_ttl=str(ttl), **ca.describe())
    return secured
