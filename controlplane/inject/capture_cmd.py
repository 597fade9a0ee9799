"""``controlplane capture``: install (or ``--clean``) the pod's traffic capture rules.

What an injected pod's init container runs, with the pod's annotations as flags; also
usable by hand in any network namespace (``ip netns exec NS controlplane capture``).
Flags become a ``CaptureConfig`` (names resolved here, the one place with I/O besides
iptables itself), ``capture.plan`` makes the rules, ``iptables.install`` applies them.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from controlplane import logs
from controlplane.inject import iptables
from controlplane.inject.capture import (
    CaptureConfig,
    CaptureError,
    clean_plan,
    parse_list,
    parse_ports,
    plan,
    render,
    split_address,
)

_log = logs.get_logger("controlplane.capture")


def resolve_addresses(addresses: list[str]) -> tuple[str, ...]:
    """``HOST:PORT`` -> ``IP:PORT`` for every address of HOST. A name that does not
    resolve is skipped with a warning, not an error: the sidecar's own xDS stream is
    left alone by its UID anyway, and an init container that fails on a DNS hiccup
    would keep the whole pod from starting."""
    resolved: list[str] = []
    for text in addresses:
        try:
            host, port = split_address(text)
        except ValueError as exc:
            raise CaptureError([f"--exclude-address: {exc}; give HOST:PORT, e.g. "
                                "controlplane.controlplane.svc:18000"]) from exc
        try:
            ips = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                _log.warning("capture.exclude_address_unresolved", address=text,
                             error=str(exc), hint="the sidecar's UID still keeps its own "
                             "xDS stream out of capture; other processes' calls to it are "
                             "captured")
                continue
            ips = sorted({str(info[4][0]) for info in infos})
        for ip in ips:
            entry = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            if entry not in resolved:
                resolved.append(entry)
    return tuple(resolved)


def config_from_args(args: argparse.Namespace) -> CaptureConfig:
    return CaptureConfig(
        proxy_uid=args.proxy_uid, proxy_gid=args.proxy_gid,
        outbound_port=args.outbound_port, inbound_port=args.inbound_port,
        include_inbound_ports=args.include_inbound_ports,
        exclude_inbound_ports=parse_ports(args.exclude_inbound_ports,
                                          "--exclude-inbound-ports"),
        exclude_outbound_ports=parse_ports(args.exclude_outbound_ports,
                                           "--exclude-outbound-ports"),
        exclude_outbound_cidrs=parse_list(args.exclude_outbound_cidrs),
        include_outbound_cidrs=args.include_outbound_cidrs,
        exclude_addresses=resolve_addresses(args.exclude_address),
        ipv6=args.ipv6)


def run(args: argparse.Namespace) -> int:
    logs.configure(args.log_level, args.log_format)
    try:
        if args.clean and args.dry_run:
            sys.stdout.write(render(clean_plan()))
            return 0
        if args.clean:
            for outcome in iptables.clean(ipv6=args.ipv6):
                _log.info("capture.cleaned", iptables=outcome.binary,
                          removed=outcome.script is not None)
            return 0
        config = config_from_args(args)
        if args.dry_run:
            families = [4, 6] if config.ipv6 else [4]
            sys.stdout.write("".join(render(plan(config, f), f) for f in families))
            return 0
        for outcome in iptables.install(config):
            _log.info("capture.installed", iptables=outcome.binary, rules=outcome.rules,
                      outbound_port=config.outbound_port, inbound_port=config.inbound_port,
                      proxy_uid=config.proxy_uid,
                      include_inbound_ports=config.include_inbound_ports,
                      exclude_inbound_ports=list(config.exclude_inbound_ports),
                      exclude_outbound_ports=list(config.exclude_outbound_ports),
                      exclude_outbound_cidrs=list(config.exclude_outbound_cidrs),
                      include_outbound_cidrs=config.include_outbound_cidrs,
                      exclude_addresses=list(config.exclude_addresses))
    except CaptureError as exc:
        for problem in exc.problems:
            print(f"controlplane capture: {problem}", file=sys.stderr)
        return 1
    return 0
