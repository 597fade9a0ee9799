"""Who is calling, once authenticated, and why a caller was refused. (Its own module so
that ``tokens`` and ``authn`` can both use it; import it from ``authn``.)"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Literal

from controlplane.security.identity import SpiffeId

Status = Literal["UNAUTHENTICATED", "PERMISSION_DENIED", "UNAVAILABLE"]


@dataclass(frozen=True)
class Caller:
    """An authenticated proxy. ``identity`` comes from the credential, never from the node.
    ``pod``: the pod the credential is bound to (Kubernetes); ``node_id``: the node id a
    file-mode token is bound to; ``expires``: when the credential stops being valid."""

    identity: SpiffeId
    pod: str | None = None
    node_id: str | None = None
    expires: datetime.datetime | None = None


class AuthError(Exception):
    """A refused credential. ``status`` is the gRPC status to answer with: UNAUTHENTICATED
    (no or bad credential), PERMISSION_DENIED (a good credential used for something it does
    not cover), UNAVAILABLE (the credential could not be checked now: retry). The message
    names what to fix and never holds the credential itself."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status: Status = status
        self.message = message
