"""``controlplane bootstrap``: the flags, and the files the command reads and writes.

The bootstrap itself is made by the pure :mod:`controlplane.bootstrap`; this module is
its edge: it parses flags, reads the trust bundle, mints a file-mode token and writes
the output.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane import bootstrap as boot

if TYPE_CHECKING:  # imported when used: cryptography is slow to load for the plain path
    from controlplane.security.ca import CertificateAuthority


def run(args: argparse.Namespace) -> int:
    capture = bool(args.capture)

    def pick(given: int | None, captured: int | None, plain: int | None) -> int | None:
        return given if given is not None else captured if capture else plain

    try:
        args.service = args.service or args.gateway
        if not args.service:
            raise ValueError("--service is required (the service this sidecar belongs "
                             "to), unless --gateway names the Gateway it serves")
        bundle, bundle_file, token_file = _credentials(args)
        if args.grpc_server and not args.grpc:
            raise ValueError("--grpc-server is for --grpc bootstraps: a sidecar's inbound "
                             "listener serves its app")
        if args.cert_dir and not args.grpc:
            raise ValueError("--cert-dir is for --grpc clients: a sidecar gets its "
                             "certificates over SDS")
        if args.grpc:
            text = _grpc(args, bundle_file if bundle else None, token_file)
        else:
            text = boot.render_bootstrap(boot.BootstrapOptions(
                node_id=args.node_id, service=args.service, namespace=args.namespace,
                xds_address=args.xds_address,
                admin_port=pick(args.admin_port, boot.CAPTURE_ADMIN_PORT, 9901) or 0,
                admin_address=args.admin_address, egress_port=args.egress_port,
                inbound_port=pick(args.inbound_port, boot.CAPTURE_INBOUND_PORT, None),
                app_port=args.app_port,
                inbound_address=args.inbound_address, delta=args.delta, zone=args.zone,
                on_demand=args.on_demand, capture=capture,
                service_account=args.service_account, instance_ip=args.instance_ip,
                stats_port=pick(args.stats_port, boot.CAPTURE_STATS_PORT, None),
                health_port=pick(args.health_port, boot.CAPTURE_HEALTH_PORT, None),
                xds_ca=bundle, xds_ca_file=bundle_file, token_file=token_file,
                gateway=args.gateway))
        if args.ca_dir:
            _mint(args, token_file)
    except (ValueError, OSError) as exc:
        print(f"controlplane bootstrap: {exc}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _grpc(args: argparse.Namespace, bundle_file: str | None, token_file: str | None) -> str:
    """A proxyless gRPC client's JSON bootstrap (gRPC reads state of the world only)."""
    from controlplane.bootstrap_grpc import GrpcBootstrapOptions, render_grpc_bootstrap

    if args.delta or args.on_demand or args.capture:
        raise ValueError("--grpc takes none of --delta, --on-demand, --capture: a gRPC "
                         "client speaks state-of-the-world xDS and has no listeners")
    return render_grpc_bootstrap(GrpcBootstrapOptions(
        node_id=args.node_id, service=args.service, namespace=args.namespace,
        xds_address=args.xds_address, zone=args.zone,
        xds_ca_file=str(Path(bundle_file).absolute()) if bundle_file else None,
        token_file=token_file,
        cert_dir=str(Path(args.cert_dir).absolute()) if args.cert_dir else None,
        server=args.grpc_server))


def _credentials(args: argparse.Namespace) -> tuple[str | None, str | None, str | None]:
    """(bundle PEM, where it came from, absolute token path) from the flags."""
    bundle: str | None = None
    source: str | None = args.xds_ca
    if args.xds_ca:
        bundle = _read(args.xds_ca, "--xds-ca")
    elif args.ca_dir:
        bundle = _ca(args).bundle_pem.decode()
        roots = Path(args.ca_dir) / "roots.pem"
        source = str(roots if roots.exists() else Path(args.ca_dir) / "ca.crt")
    token_file: str | None = args.token_file
    if args.ca_dir and not token_file:
        if not args.output:
            raise ValueError("--ca-dir writes the minted token to a file: give "
                             "--token-file FILE, or -o FILE (the token goes beside it)")
        token_file = str(Path(args.output).with_suffix(".token"))
    if token_file:
        token_file = str(Path(token_file).absolute())
        if args.output and Path(args.output).absolute() == Path(token_file):
            raise ValueError(f"--token-file and -o are both {args.output}; give the token "
                             "a file of its own")
    return bundle, source, token_file


def _ca(args: argparse.Namespace) -> CertificateAuthority:
    """The CA of ``--ca-dir``; never made here (the server makes it on first start)."""
    from controlplane.security.castore import CaError, load_dir

    try:
        return load_dir(Path(args.ca_dir), args.trust_domain, datetime.now(UTC),
                        create=False)
    except CaError as exc:
        raise ValueError(f"--ca-dir {args.ca_dir}: {exc}") from exc


def _mint(args: argparse.Namespace, token_file: str | None) -> None:
    """Write this proxy's token (ES256, bound to its node id) where Envoy reads it."""
    from controlplane.mesh.duration import parse_duration  # the mesh package: pydantic
    from controlplane.security import tokens
    from controlplane.security.identity import SpiffeId

    assert token_file is not None
    try:
        ttl = parse_duration(args.token_ttl)
    except ValueError as exc:
        raise ValueError(f"--token-ttl: {exc}") from exc
    if ttl.total_seconds() < 1:
        raise ValueError("--token-ttl must be at least 1s")
    spiffe = SpiffeId(args.trust_domain, args.namespace, args.service_account or "default")
    token = tokens.mint(_ca(args), spiffe, args.node_id, datetime.now(UTC), ttl)
    write_secret(Path(token_file), token)


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (0600) by rename, so a reader never sees half a token."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _read(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror}") from exc
