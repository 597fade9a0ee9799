#!/usr/bin/env python3
"""Certificates: what the mesh CA costs (issue 11).

1. **Issuance** (in this process, the server's own code): workload certificates issued
   per second (each one ECDSA P-256 key generated and one signature by the CA), bare
   ECDSA P-256 signatures per second with the CA's key, and proxy tokens minted and
   verified per second (file mode's authentication).
2. **Rotation through a running server**: the real server as a subprocess (``serve
   --ca-dir DIR --workload-cert-ttl T``, xDS over TLS); S raw gRPC ADS streams (SotW, or
   ``--delta``) in this process, each a distinct identity (ServiceAccount ``sa-i``, node
   ``pod-i.default``, a token minted for it and bound to its node), each subscribing to
   its SDS secrets (``default`` and ``ROOTCA``) and ACKing every response. Once every
   stream holds its first certificate, the bench waits for the server to rotate them
   at half their lifetime (``--trigger ttl``, the default), or rotates the CA's root
   (``--trigger ca``: ``controlplane ca rotate``; the server reads its CA directory
   every second here, ``CONTROLPLANE_CA_POLL_INTERVAL=1``, so all 1000 are re-issued
   at once), and reports: the time until every stream holds a new certificate (ttl:
   each stream's rotation against half its certificate's life, and first to last; ca:
   from the root's rotation to the first and to the last stream), the server's CPU in
   that window (/proc/PID/stat), the bytes pushed (the server's
   ``controlplane_xds_push_bytes_total``, and the serialized responses the streams
   read) and streams lost (0 is right). A rotation before its time is an error.

    .venv/bin/python bench/certs.py [--streams 1000] [--trigger ttl|ca] [--cert-ttl S]
        [--delta] [--issue 2000] [--deadline 300]

Every wait draws on one deadline; every load loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from common import (
    BenchError,
    Deadline,
    add_output_flags,
    metric,
    results_path,
    write_results,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from serverproc import ServerProcess
from xds_figures import percentile

from controlplane.security import tokens
from controlplane.security.ca import CertificateAuthority
from controlplane.security.identity import SpiffeId

BASELINE = "certs.json"
TRUST_DOMAIN = "cluster.local"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
NAMES = ["default", "ROOTCA"]  # design: CERT_SECRET, ROOT_SECRET
STREAMS_PER_CHANNEL = 50
ROTATE_FRACTION = 0.5  # the server's Issuer rotates at half a certificate's life


def _r(value: float, digits: int = 4) -> float:
    return round(value, digits)


def rate(work: Any, count: int, seconds: float) -> tuple[float, int]:
    """Run ``work()`` up to ``count`` times or for ``seconds``; (per second, done)."""
    done, started = 0, time.perf_counter()
    limit = started + seconds
    while done < count and time.perf_counter() < limit:
        work()
        done += 1
    return done / (time.perf_counter() - started), done


def issuance(count: int, seconds: float) -> dict[str, Any]:
    """The CA's rates in this process (one core): issue, sign, mint, verify."""
    now = datetime.datetime.now(datetime.UTC)
    ca = CertificateAuthority.create(TRUST_DOMAIN, now)
    spiffe = SpiffeId(TRUST_DOMAIN, "default", "bench")
    ttl = datetime.timedelta(hours=24)
    issued, n_issued = rate(lambda: ca.issue_workload(spiffe, now, ttl), count, seconds)
    key, data = ca.signing_key(), b"x" * 256
    signed, n_signed = rate(lambda: key.sign(data, ec.ECDSA(hashes.SHA256())), count, seconds)
    token = tokens.mint(ca, spiffe, "pod-0.default", now, ttl)
    minted, n_minted = rate(lambda: tokens.mint(ca, spiffe, "pod-0.default", now, ttl),
                            count, seconds)
    verified, n_verified = rate(lambda: tokens.verify(ca, token, now), count, seconds)
    return {
        "workload_certs_per_s": round(issued), "workload_certs_issued": n_issued,
        "signatures_per_s": round(signed), "signatures": n_signed,
        "tokens_minted_per_s": round(minted), "tokens_verified_per_s": round(verified),
        "tokens_verified": n_verified, "tokens_minted": n_minted,
    }


class CaServer(ServerProcess):
    """The server with a CA directory and short-lived workload certificates."""

    def __init__(self, mesh: Path, workdir: Path, ca_dir: Path, cert_ttl: float) -> None:
        super().__init__(mesh, workdir)
        self.ca_dir = ca_dir
        self.cert_ttl = cert_ttl

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "controlplane", "serve",
                 "--source", f"file:{self.mesh}",
                 "--xds-address", f"{self.xds_host}:{self.xds_port}",
                 "--admin-address", f"127.0.0.1:{self.admin_port}",
                 "--ca-dir", str(self.ca_dir), "--workload-cert-ttl", f"{self.cert_ttl:g}s",
                 "--snapshot-keep", "0", "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, env={**os.environ, **self.env})


@dataclass
class Stream:
    """One simulated sidecar: its identity, what it received and when."""

    index: int
    token: str
    first_at: float | None = None
    first_cert: bytes = b""
    rotated_at: float | None = None
    responses: int = 0
    received_bytes: int = 0
    error: str = ""

    @property
    def node_id(self) -> str:
        return f"pod-{self.index:04d}.default"

    @property
    def service_account(self) -> str:
        return f"sa-{self.index:04d}"

    def node(self) -> base_pb2.Node:
        meta = struct_pb2.Struct()
        meta.update({"namespace": "default", "service_account": self.service_account})
        return base_pb2.Node(id=self.node_id, cluster="bench", metadata=meta)


class Fleet:
    """S streams over S/50 TLS channels; ``first`` and ``rotated`` are set when every
    stream has its first certificate, and a second one."""

    def __init__(self, streams: list[Stream], port: int, bundle: bytes, delta: bool) -> None:
        self.streams = streams
        self.delta = delta
        credentials = grpc.ssl_channel_credentials(root_certificates=bundle)
        self.channels = [
            grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials,
                                    options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(0, len(streams), STREAMS_PER_CHANNEL)]
        self.first = asyncio.Event()
        self.rotated = asyncio.Event()
        self.counting = False
        self.window_bytes = 0
        self.tasks: list[asyncio.Task[None]] = []

    def open(self) -> None:
        for stream in self.streams:
            channel = self.channels[stream.index // STREAMS_PER_CHANNEL]
            self.tasks.append(asyncio.ensure_future(self._run(stream, channel)))

    def _received(self, stream: Stream, cert: bytes, size: int) -> None:
        now = time.perf_counter()
        stream.responses += 1
        stream.received_bytes += size
        if self.counting:
            self.window_bytes += size
        if not cert:
            return
        if stream.first_at is None:
            stream.first_at, stream.first_cert = now, cert
            if stream.index == 0:
                check_identity(cert, stream)
            if all(s.first_at is not None for s in self.streams):
                self.first.set()
        elif stream.rotated_at is None and cert != stream.first_cert:
            stream.rotated_at = now
            if all(s.rotated_at is not None for s in self.streams):
                self.rotated.set()

    async def _run(self, stream: Stream, channel: grpc.aio.Channel) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        metadata = (("authorization", f"Bearer {stream.token}"),)
        try:
            if self.delta:
                await self._delta(stream, stub.DeltaAggregatedResources(metadata=metadata))
            else:
                await self._sotw(stream, stub.StreamAggregatedResources(metadata=metadata))
        except grpc.aio.AioRpcError as exc:
            stream.error = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            pass

    async def _sotw(self, stream: Stream, call: Any) -> None:
        await call.write(discovery_pb2.DiscoveryRequest(
            node=stream.node(), type_url=SECRET, resource_names=NAMES))
        while (response := await call.read()) is not grpc.aio.EOF:
            cert = b""
            for packed in response.resources:
                secret = secret_pb2.Secret.FromString(packed.value)
                if secret.name == NAMES[0]:
                    cert = secret.tls_certificate.certificate_chain.inline_bytes
            self._received(stream, cert, response.ByteSize())
            await call.write(discovery_pb2.DiscoveryRequest(
                type_url=SECRET, resource_names=NAMES, version_info=response.version_info,
                response_nonce=response.nonce))
        stream.error = stream.error or "the server ended the stream"

    async def _delta(self, stream: Stream, call: Any) -> None:
        await call.write(discovery_pb2.DeltaDiscoveryRequest(
            node=stream.node(), type_url=SECRET, resource_names_subscribe=NAMES))
        while (response := await call.read()) is not grpc.aio.EOF:
            cert = b""
            for resource in response.resources:
                if resource.name == NAMES[0]:
                    secret = secret_pb2.Secret.FromString(resource.resource.value)
                    cert = secret.tls_certificate.certificate_chain.inline_bytes
            self._received(stream, cert, response.ByteSize())
            await call.write(discovery_pb2.DeltaDiscoveryRequest(
                type_url=SECRET, response_nonce=response.nonce))
        stream.error = stream.error or "the server ended the stream"

    def progress(self, what: str) -> str:
        done = sum(1 for s in self.streams
                   if (s.first_at if what == "first" else s.rotated_at) is not None)
        errors = [s.error for s in self.streams if s.error]
        return f"{done}/{len(self.streams)}; errors: {len(errors)} {errors[:2]}"

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        for channel in self.channels:
            await channel.close()


def check_identity(cert_pem: bytes, stream: Stream) -> None:
    """The bench's own check that a stream got its own identity's certificate."""
    leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    uris = leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    want = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{stream.service_account}"
    if uris != [want]:
        raise BenchError(f"stream {stream.index} got a certificate for {uris}, not {want}")


def load_ca(ca_dir: Path) -> CertificateAuthority:
    from controlplane.security.castore import load_dir

    return load_dir(ca_dir, TRUST_DOMAIN, datetime.datetime.now(datetime.UTC), create=False)


async def rotation(streams_n: int, cert_ttl: float, delta: bool, trigger: str,
                   deadline: Deadline) -> dict[str, Any]:
    """Connect the fleet, then time one rotation of every stream's certificate: at half
    their life (``ttl``), or all at once when the CA's root is rotated (``ca``)."""
    with tempfile.TemporaryDirectory(prefix="bench-certs-") as tmp:
        work = Path(tmp)
        mesh = work / "mesh.yaml"
        mesh.write_text("services:\n  - name: bench\n    port: 9080\n    endpoints: []\n")
        ca_dir = work / "ca"
        server = CaServer(mesh, work, ca_dir, cert_ttl)
        if trigger == "ca":  # the server reads its CA directory again every second
            server.env["CONTROLPLANE_CA_POLL_INTERVAL"] = "1"
        server.start()
        fleet: Fleet | None = None
        try:
            server.wait_ready(deadline.left(60))
            ca = load_ca(ca_dir)
            now = datetime.datetime.now(datetime.UTC)
            streams = [Stream(i, "") for i in range(streams_n)]
            for stream in streams:
                stream.token = tokens.mint(
                    ca, SpiffeId(TRUST_DOMAIN, "default", stream.service_account),
                    stream.node_id, now, datetime.timedelta(hours=1))
            fleet = Fleet(streams, server.xds_port, ca.bundle_pem, delta)
            opened = time.perf_counter()
            fleet.open()
            await deadline.wait("every stream's first certificate", fleet.first.wait(),
                                lambda: fleet.progress("first") if fleet else "")
            firsts = [s.first_at or 0.0 for s in streams]
            connect_s = max(firsts) - opened
            due = [f + cert_ttl * ROTATE_FRACTION for f in firsts]
            window_start = (min(due) - 1.0 if trigger == "ttl"
                            else time.perf_counter() + 1.0)
            if window_start < time.perf_counter():
                raise BenchError(
                    f"rotation is due {min(due) - time.perf_counter():.1f} s from now, before "
                    f"the streams settled ({connect_s:.1f} s to connect): give a longer "
                    f"--cert-ttl (> {2 * (connect_s + 5):.0f})")
            await asyncio.sleep(window_start - time.perf_counter())
            early = [s for s in streams if s.rotated_at is not None]
            if early:
                after = (early[0].rotated_at or 0.0) - (early[0].first_at or 0.0)
                raise BenchError(
                    f"{len(early)} streams got a new certificate before it was due (stream "
                    f"{early[0].index}: {after:.1f} s after its first, due after "
                    f"{cert_ttl * ROTATE_FRACTION:g} s): the server rotates early")
            before_metrics, cpu_before = await server.metrics(), server.cpu_seconds()
            fleet.counting = True
            triggered = time.perf_counter()
            if trigger == "ca":
                await asyncio.to_thread(rotate_ca, ca_dir)
                triggered = time.perf_counter()
            await deadline.wait("every stream's new certificate", fleet.rotated.wait(),
                                lambda: fleet.progress("rotated") if fleet else "")
            await server.idle(deadline.left(30))
            fleet.counting = False
            cpu = server.cpu_seconds() - cpu_before
            after_metrics = await server.metrics()
            lost = [s.error for s in streams if s.error]
            rotated = [s.rotated_at or 0.0 for s in streams]
            pushed = (metric(after_metrics, "controlplane_xds_push_bytes_total")
                      - metric(before_metrics, "controlplane_xds_push_bytes_total"))
            result: dict[str, Any] = {
                "streams": streams_n, "protocol": "delta" if delta else "sotw",
                "trigger": trigger, "cert_ttl_s": cert_ttl, "connect_all_s": _r(connect_s),
                "connect_spread_s": _r(max(firsts) - min(firsts)),
                "first_to_last_rotation_s": _r(max(rotated) - min(rotated)),
                "server_cpu_s": _r(cpu, 3),
                "server_cpu_ms_per_rotation": _r(cpu * 1000 / streams_n, 3),
                "push_bytes_server": int(pushed),
                "response_bytes_read": fleet.window_bytes,
                "bytes_per_rotation": round(fleet.window_bytes / streams_n),
                "responses_per_stream_median": statistics.median(
                    s.responses for s in streams),
                "streams_lost": len(lost), "lost_sample": lost[:3],
                "server_rss_mib": _r(server.memory_mib("VmRSS"), 1),
                "server_log_sample": server.log_sample(),
            }
            if trigger == "ca":
                result["ca_rotated_to_first_s"] = _r(min(rotated) - triggered)
                result["ca_rotated_to_all_s"] = _r(max(rotated) - triggered)
            else:
                late = [r - d for r, d in zip(rotated, due, strict=True)]
                result["after_half_life_s"] = {
                    "p50": _r(percentile(late, 50)), "p99": _r(percentile(late, 99)),
                    "max": _r(max(late)), "min": _r(min(late))}
            return result
        finally:
            if fleet is not None:
                await fleet.close()
            server.stop()


def rotate_ca(ca_dir: Path) -> None:
    """A new root signs from now on (``controlplane ca rotate --ca-dir``)."""
    from controlplane.security.castore import rotate_dir

    rotate_dir(ca_dir, TRUST_DOMAIN, datetime.datetime.now(datetime.UTC))


def report(result: dict[str, Any]) -> None:
    issue = result["issuance"]
    print(f"issuance: {issue['workload_certs_per_s']} workload certs/s (key + signature), "
          f"{issue['signatures_per_s']} ECDSA P-256 signatures/s, tokens "
          f"{issue['tokens_minted_per_s']} minted/s, {issue['tokens_verified_per_s']} "
          f"verified/s")
    rot = result.get("rotation")
    if rot:
        if rot["trigger"] == "ca":
            when = (f"the CA's root rotated: first stream has its new certificate after "
                    f"{rot['ca_rotated_to_first_s']} s (the server reads the CA every 1 s), "
                    f"all {rot['streams']} after {rot['ca_rotated_to_all_s']} s")
        else:
            late = rot["after_half_life_s"]
            when = (f"at half their {rot['cert_ttl_s']:g} s life: each came {late['p50']} s "
                    f"(p50), {late['p99']} s (p99) after half the life since its first "
                    f"arrived (certificate times have 1 s resolution); first to last "
                    f"{rot['first_to_last_rotation_s']} s, as the streams connected over "
                    f"{rot['connect_spread_s']} s")
        print(f"rotation of {rot['streams']} certificates ({rot['protocol']}), {when}; "
              f"server CPU {rot['server_cpu_s']} s ({rot['server_cpu_ms_per_rotation']} ms "
              f"per certificate); pushed {rot['push_bytes_server']} bytes (server), "
              f"{rot['response_bytes_read']} read ({rot['bytes_per_rotation']} per stream); "
              f"streams lost {rot['streams_lost']}")
    if "error" in result:
        print(f"error: {result['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--cert-ttl", type=float, default=None,
                        help="workload certificate lifetime, seconds (rotated at half; "
                             "default 120, and 86400 with --trigger ca)")
    parser.add_argument("--delta", action="store_true")
    parser.add_argument("--trigger", choices=["ttl", "ca"], default="ttl",
                        help="rotate at half the certificates' life (ttl), or all at once "
                             "by rotating the CA's root (ca)")
    parser.add_argument("--issue", type=int, default=2000,
                        help="operations per issuance figure (each also capped at 10 s)")
    parser.add_argument("--no-rotation", action="store_true",
                        help="only the issuance figures")
    parser.add_argument("--deadline", type=float, default=300.0)
    add_output_flags(parser, BASELINE)
    args = parser.parse_args(argv)
    deadline = Deadline(args.deadline)
    result: dict[str, Any] = {"issuance": issuance(args.issue, 10.0), "cores": os.cpu_count()}
    code = 0
    ttl = args.cert_ttl or (86400.0 if args.trigger == "ca" else 120.0)
    if not args.no_rotation:
        try:
            result["rotation"] = asyncio.run(
                rotation(args.streams, ttl, args.delta, args.trigger, deadline))
        except BenchError as exc:
            result["error"] = str(exc)
            code = 1
    report(result)
    write_results(results_path(BASELINE, args.out, args.update_baseline),
                  json.dumps(result, indent=2), BASELINE)
    return code


if __name__ == "__main__":
    sys.exit(main())
