"""Names the API server double's modules share."""

from __future__ import annotations

from typing import Any, Final

from controlplane.sources.kubernetes.kinds import (
    DEPLOYMENTS,
    ENDPOINT_SLICES,
    MUTATING_WEBHOOKS,
    PODS,
    SECRETS,
    SECURITY_POLICIES,
    SERVICE_ACCOUNTS,
    SERVICES,
    SIDECARS,
    TELEMETRIES,
    TOKEN_REVIEWS,
    TRAFFIC_POLICIES,
    WATCHED,
)
from tests.kube.gateway_api import STATUS_SUBRESOURCE as _GATEWAY_API_STATUS

Obj = dict[str, Any]

TOKEN: Final = "apiserver-double-token"  # the control plane's service account (RBAC applies)
ADMIN_TOKEN: Final = "apiserver-double-admin"  # a cluster admin: what tests write with
# What the double serves: what the source watches, what the webhook writes, and the
# ServiceAccounts and TokenReviews of proxy authentication (tests/kube/tokens.py).
# Deployments: what the gateway controller makes for each Gateway.
SERVED: Final = (*WATCHED, SECRETS, MUTATING_WEBHOOKS, SERVICE_ACCOUNTS, TOKEN_REVIEWS,
                 DEPLOYMENTS)
_BUILTIN: Final = frozenset({SERVICES, ENDPOINT_SLICES, PODS, SECRETS,
                             MUTATING_WEBHOOKS, SERVICE_ACCOUNTS,
                             DEPLOYMENTS})  # list items: no kind/apiVersion
_STATUS_SUBRESOURCE: Final = frozenset({SERVICES, TRAFFIC_POLICIES, SIDECARS, PODS,
                                        DEPLOYMENTS,
                                        SECURITY_POLICIES, TELEMETRIES,
                                        *_GATEWAY_API_STATUS})
_TRUE: Final = frozenset({"1", "t", "T", "TRUE", "true", "True"})  # Go's strconv.ParseBool
_FALSE: Final = frozenset({"0", "f", "F", "FALSE", "false", "False"})

