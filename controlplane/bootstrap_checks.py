"""What ``controlplane bootstrap`` refuses: what Envoy would reject later, or what the
server would silently misread, each with the flag to fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

from controlplane.bootstrap_xds import check_bundle, is_ip

if TYPE_CHECKING:
    from controlplane.bootstrap import BootstrapOptions


def check(options: BootstrapOptions) -> None:
    """Reject what Envoy would reject later, or what the server would silently misread."""
    if not options.node_id:
        raise ValueError("--node-id must not be empty: Envoy needs a unique id per proxy")
    if not options.service:
        raise ValueError("--service must not be empty: it names the sidecar's service")
    if not options.namespace:
        raise ValueError("--namespace must not be empty (the default is 'default')")
    if options.gateway is not None:
        _check_gateway(options)
    if options.capture:
        if options.app_port is not None:
            raise ValueError("--app-port does not go with --capture: captured traffic keeps "
                             "its original destination port; leave --app-port out")
        if options.inbound_port is None:
            raise ValueError("--capture needs --inbound-port (15006 by default)")
    elif (options.inbound_port is None) != (options.app_port is None):
        raise ValueError("--inbound-port and --app-port go together; give both or neither")
    _check_port("--admin-port", options.admin_port, allow_zero=True)
    _check_port("--egress-port", options.egress_port)
    if options.inbound_port is not None:
        _check_port("--inbound-port", options.inbound_port)
    if options.app_port is not None:
        _check_port("--app-port", options.app_port)
    _check_distinct(options)
    _check_security(options)
    if not is_ip(options.admin_address):
        raise ValueError(f"--admin-address must be an IP address, got {options.admin_address!r}")
    if not is_ip(options.inbound_address):
        raise ValueError(
            f"--inbound-address must be an IP address, got {options.inbound_address!r}"
        )


def _check_gateway(options: BootstrapOptions) -> None:
    if not options.gateway:
        raise ValueError("--gateway must name the Gateway this proxy serves")
    if options.capture or options.inbound_port is not None or options.app_port is not None:
        raise ValueError("--gateway does not go with --capture, --inbound-port or "
                         "--app-port: a gateway serves its Gateway's listeners only")
    if options.on_demand:
        raise ValueError("--gateway does not go with --on-demand: a gateway gets the "
                         "routes of its Gateway's listeners up front")


def _check_security(options: BootstrapOptions) -> None:
    if options.xds_ca is not None:
        check_bundle(options.xds_ca)
    if options.token_file is None:
        return
    if options.xds_ca is None:
        raise ValueError("--token-file needs --xds-ca: gRPC sends a credential over TLS "
                         "only; give the control plane's trust bundle with --xds-ca")
    if not options.token_file.startswith("/"):
        raise ValueError(f"--token-file must be an absolute path (Envoy reads it from its "
                         f"own working directory), got {options.token_file!r}")


def _check_distinct(options: BootstrapOptions) -> None:
    """Two listeners on one port: Envoy would reject the second at run time."""
    seen: dict[int, str] = {}
    for flag, port in (("--egress-port", options.egress_port),
                       ("--inbound-port", options.inbound_port),
                       ("--stats-port", options.stats_port),
                       ("--health-port", options.health_port)):
        if port is None:
            continue
        _check_port(flag, port)
        if port in seen:
            raise ValueError(f"{seen[port]} and {flag} are both {port}; "
                             "each listener needs its own port")
        seen[port] = flag
    served = options.stats_port is not None or options.health_port is not None
    if served and options.admin_port == 0:
        raise ValueError("--stats-port and --health-port forward to the admin, whose port "
                         "must then be known: give --admin-port a number, not 0")
    if served and options.admin_port in seen:
        raise ValueError(f"--admin-port and {seen[options.admin_port]} are both "
                         f"{options.admin_port}; give the admin its own port")


def _check_port(flag: str, port: int, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port < 65536:
        raise ValueError(f"{flag} must be a port number from {low} to 65535, got {port!r}")
