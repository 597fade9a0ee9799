"""``controlplane serve``: settings from the flags (and the environment), then the server
until a signal; a listen address that is taken is one line naming its flag."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from controlplane import logs
from controlplane.errors import ControlPlaneError


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from controlplane.app import serve
    from controlplane.settings import ServeSettings

    given: dict[str, Any] = {
        key: value
        for key, value in {
            "source": args.source,
            "xds_address": args.xds_address,
            "admin_address": args.admin_address,
            "kubeconfig": args.kubeconfig,
            "namespace": args.namespace,
            "pod_labels": False if args.no_pod_labels else None,
            "snapshot_dir": args.snapshot_dir,
            "snapshot_keep": args.snapshot_keep,
            "group_ttl": args.group_ttl,
            "convergence_warn_after": args.convergence_warn_after,
            "shutdown_grace": args.shutdown_grace,
            "log_level": args.log_level,
            "log_format": args.log_format,
            "max_large_writes": args.max_large_writes,
            "large_write_bytes": args.large_write_bytes,
            "large_write_turn_seconds": args.large_write_turn_seconds,
            "outbound_traffic_policy": args.outbound_traffic_policy,
            "webhook_address": args.webhook_address,
            "webhook_cert": args.webhook_cert,
            "webhook_key": args.webhook_key,
            "webhook_ca": args.webhook_ca,
            "webhook_namespace": args.webhook_namespace,
            "inject_failure_policy": args.inject_failure_policy,
            "inject_proxy_image": args.inject_proxy_image,
            "inject_init_image": args.inject_init_image,
            "inject_xds_address": args.inject_xds_address,
            "ca_dir": args.ca_dir,
            "ca_cert": args.ca_cert,
            "ca_key": args.ca_key,
            "ca_bundle": args.ca_bundle,
            "ca_secret": args.ca_secret,
            "trust_domain": args.trust_domain,
            "workload_cert_ttl": args.workload_cert_ttl,
            "authentication": args.authentication,
            "xds_server_name": args.xds_server_name,
            "status_namespace": args.status_namespace,
            "max_connection_age": args.max_connection_age,
            "max_connection_age_grace": args.max_connection_age_grace,
        }.items()
        if value is not None
    }
    try:
        settings = ServeSettings(**given)
    except ValidationError as exc:
        for err in exc.errors():
            field = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-")
            print(f"controlplane serve: {field}: {err['msg']}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (ControlPlaneError, ValueError, OSError) as exc:
        print(f"controlplane serve: {_bind_error(exc, settings) or exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        told = _bind_error(exc, settings)
        if told is None:
            raise
        print(f"controlplane serve: {told}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _bind_error(exc: BaseException, settings: Any) -> str | None:
    """One line for a listen address that is taken or not ours, naming the flag to
    change; None for any other error."""
    text = str(exc)
    if text.startswith("Failed to bind"):
        address, flag = settings.xds_address, "--xds-address"
    elif isinstance(exc, OSError) and "bind" in text:
        address, flag = settings.admin_address, "--admin-address"
    else:
        return None
    return (f"cannot listen on {address} ({flag}): the port is in use or the address is "
            f"not this machine's; stop what uses it, or choose another with {flag}")
