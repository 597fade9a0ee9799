"""The lab's workload identities: the mesh CA in its work directory (``serve --ca-dir``
reads the same one) and, per sidecar, a token minted for its service account and bound
to its node id, as ``controlplane bootstrap --ca-dir`` mints one. With them every sidecar
reaches xDS over TLS, gets its own certificate over SDS, and calls the others over mTLS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from controlplane.bootstrap_cmd import write_secret
from controlplane.security import tokens
from controlplane.security.castore import load_dir
from controlplane.security.identity import DEFAULT_TRUST_DOMAIN, SpiffeId

NAMESPACE = "default"  # the lab's sidecars all say so in their node metadata
TOKEN_TTL = timedelta(days=30)  # a lab runs for hours at most; no rotation needed


@dataclass(frozen=True)
class SidecarIdentity:
    """What one sidecar's bootstrap needs: the trust bundle, and its token's file."""

    spiffe: SpiffeId
    bundle_pem: str
    token_file: Path


class LabCa:
    """The CA in ``workdir/ca``: made here before the server starts (which reads it)."""

    def __init__(self, workdir: Path) -> None:
        self.directory = workdir / "ca"
        self.tokens = workdir / "tokens"
        self.ca = load_dir(self.directory, DEFAULT_TRUST_DOMAIN, datetime.now(UTC))

    def identity(self, node_id: str, service_account: str,
                 owner: int | None = None) -> SidecarIdentity:
        """A token for ``service_account`` bound to ``node_id``; ``owner``: the user
        Envoy runs as, when not this one (captured: UID 1337 reads its own token)."""
        spiffe = SpiffeId(DEFAULT_TRUST_DOMAIN, NAMESPACE, service_account)
        token = tokens.mint(self.ca, spiffe, node_id, datetime.now(UTC), TOKEN_TTL)
        path = self.tokens / f"{node_id}.token"
        write_secret(path, token)
        if owner is not None:
            self.tokens.chmod(0o755)
            os.chown(path, owner, owner)
        return SidecarIdentity(spiffe, self.ca.bundle_pem.decode(), path.absolute())
