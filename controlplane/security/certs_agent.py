"""The certificate agent of a proxyless gRPC workload (``controlplane certs``).

gRPC reads its mesh certificate from files (gRFC A29's ``file_watcher``); a sidecar gets
its own over SDS. This agent bridges the two as the workload itself: it opens an xDS
stream with the client's node and token (the server authenticates it as any proxy and
answers the SDS names ``default`` and ``ROOTCA`` for the token's identity only), writes
what it gets (``certs_files.publish``: all three files switch at once, the key 0600),
and writes again whenever the server pushes a rotated certificate or new roots.

A refusal (UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT) ends it with the
server's message; any other end of the stream is retried with backoff. The first
certificate must come within ``first_within`` seconds. The key is never logged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
import grpc.aio
import structlog
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from controlplane import resource
from controlplane.security.certs_files import publish
from controlplane.security.certs_plan import CertsPlan
from controlplane.security.sds import CERT_SECRET, ROOT_SECRET

log = structlog.get_logger("controlplane.security.certs")

ADS: Final = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
NAMES: Final = [CERT_SECRET, ROOT_SECRET]
REFUSED: Final = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                            grpc.StatusCode.INVALID_ARGUMENT})
MIN_BACKOFF: Final = 0.5
MAX_BACKOFF: Final = 30.0
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
MAX_TOKEN_BYTES: Final = 16 * 1024


class CertsFailed(Exception):
    """The agent cannot get a certificate; the message says why and what to do."""


@dataclass(frozen=True)
class Published:
    """What was written last (the key only to compare with, never shown)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    bundle_pem: bytes

    def describe(self) -> dict[str, Any]:
        leaf = x509.load_pem_x509_certificates(self.cert_pem)[0]
        try:
            sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uris = sans.value.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        return {"identity": uris[0] if uris else "", "serial": f"{leaf.serial_number:x}",
                "not_after": leaf.not_valid_after_utc.isoformat(),
                "roots": len(x509.load_pem_x509_certificates(self.bundle_pem))}


class Agent:
    """One workload's agent: ``run`` until refused, or (``once``) until written."""

    def __init__(self, plan: CertsPlan, once: bool = False, first_within: float = 60.0) -> None:
        self.plan = plan
        self.once = once
        self.first_within = first_within
        self.published: Published | None = None
        self.writes = 0

    async def run(self) -> None:
        delay = MIN_BACKOFF
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.first_within
        while True:
            try:
                async with asyncio.timeout_at(None if self.published else deadline) as bound:
                    await self._stream(bound)
                    if self.once and self.published is not None:
                        return
                    log.info("certs.stream_ended", hint="the server closed the stream "
                             "(a restart, or its max connection age); reconnecting")
                    delay = MIN_BACKOFF
            except TimeoutError:
                raise CertsFailed(
                    f"no certificate from {self.plan.server} within {self.first_within:g}s: "
                    "check that the server runs a CA (serve --ca-dir, or in Kubernetes) "
                    "and is reachable, and its log for this node "
                    f"({self.plan.node.id!r})") from None
            except grpc.aio.AioRpcError as exc:
                if exc.code() in REFUSED:
                    raise CertsFailed(
                        f"refused by {self.plan.server} ({exc.code().name}): "
                        f"{exc.details()}") from None
                log.warning("certs.stream_failed", code=exc.code().name,
                            details=(exc.details() or "")[:300], retry_in=delay)
            wait = delay if self.published else min(delay, max(0.0, deadline - loop.time()))
            await asyncio.sleep(wait)  # backoff between attempts
            delay = min(delay * 2, MAX_BACKOFF)

    async def _stream(self, bound: asyncio.Timeout) -> None:
        async with self._channel() as channel:
            call = channel.stream_stream(
                ADS, request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )(metadata=self._metadata())
            await _send(call, discovery_pb2.DiscoveryRequest(
                node=self.plan.node, type_url=resource.SECRET, resource_names=NAMES))
            log.info("certs.connected", server=self.plan.server, node=self.plan.node.id)
            held: dict[str, secret_pb2.Secret] = {}
            accepted = ""  # the last version ACKed on this stream (what a NACK names)
            async for response in _responses(call):
                problem = _take(response, held)
                await _send(call, _answer(response, problem, accepted))
                if problem is None:
                    accepted = response.version_info
                else:
                    log.warning("certs.rejected", problem=problem, version=response.version_info)
                    continue
                if self._publish(held):
                    bound.reschedule(None)  # the first certificate is in: no deadline now
                if self.once and self.published is not None:
                    call.cancel()
                    return

    def _publish(self, held: dict[str, secret_pb2.Secret]) -> bool:
        if CERT_SECRET not in held or ROOT_SECRET not in held:
            return False
        tls = held[CERT_SECRET].tls_certificate
        made = Published(tls.certificate_chain.inline_bytes, tls.private_key.inline_bytes,
                         held[ROOT_SECRET].validation_context.trusted_ca.inline_bytes)
        if made == self.published:
            return False
        plan = self.plan
        publish(plan.directory, {plan.bundle_file.name: (made.bundle_pem, 0o644),
                                 plan.key_file.name: (made.key_pem, 0o600),
                                 plan.cert_file.name: (made.cert_pem, 0o644)})
        self.published = made
        self.writes += 1
        log.info("certs.written", directory=str(plan.directory), **made.describe())
        return True

    def _channel(self) -> grpc.aio.Channel:
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length",
                                           MAX_MESSAGE_BYTES)]
        if self.plan.ca_file is None:
            return grpc.aio.insecure_channel(self.plan.server, options)
        bundle = _read(Path(self.plan.ca_file), "the xDS CA file", 1024 * 1024)
        return grpc.aio.secure_channel(
            self.plan.server, grpc.ssl_channel_credentials(root_certificates=bundle), options)

    def _metadata(self) -> list[tuple[str, str]]:
        """The token, read again for each stream (the file is rotated)."""
        if self.plan.token_file is None:
            return []
        token = _read(Path(self.plan.token_file), "the token file", MAX_TOKEN_BYTES)
        text = token.decode(errors="replace").strip()
        if not text:
            raise CertsFailed(f"the token file {self.plan.token_file} is empty")
        return [("authorization", f"Bearer {text}")]


async def _send(call: Any, request: discovery_pb2.DiscoveryRequest) -> None:
    """Write ``request``; a call the server already ended raises its status (a refusal
    may end it before the first write)."""
    try:
        await call.write(request)
    except asyncio.InvalidStateError:
        raise grpc.aio.AioRpcError(await call.code(), grpc.aio.Metadata(),
                                   grpc.aio.Metadata(), await call.details()) from None


async def _responses(call: Any) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:
            return
        yield response


def _take(response: discovery_pb2.DiscoveryResponse,
          held: dict[str, secret_pb2.Secret]) -> str | None:
    """Add the response's secrets to ``held``; why it is unusable, or None."""
    found: dict[str, secret_pb2.Secret] = {}
    for packed in response.resources:
        secret = secret_pb2.Secret()
        if packed.type_url != resource.SECRET or not packed.Unpack(secret):
            return f"a resource of type {packed.type_url[:200]!r}, not a Secret"
        found[secret.name] = secret
    cert = found.get(CERT_SECRET)
    if cert is not None and not (cert.tls_certificate.certificate_chain.inline_bytes
                                 and cert.tls_certificate.private_key.inline_bytes):
        return f"secret {CERT_SECRET!r} has no inline certificate chain and key"
    roots = found.get(ROOT_SECRET)
    if roots is not None and not roots.validation_context.trusted_ca.inline_bytes:
        return f"secret {ROOT_SECRET!r} has no inline trusted CA"
    held.update((name, found[name]) for name in NAMES if name in found)
    return None


def _answer(response: discovery_pb2.DiscoveryResponse, problem: str | None,
            accepted: str) -> discovery_pb2.DiscoveryRequest:
    """The ACK of ``response``, or its NACK with ``problem`` (naming ``accepted``)."""
    asked = discovery_pb2.DiscoveryRequest(type_url=resource.SECRET, resource_names=NAMES,
                                           response_nonce=response.nonce,
                                           version_info=response.version_info)
    if problem is not None:
        asked.version_info = accepted
        asked.error_detail.CopyFrom(status_pb2.Status(code=3, message=problem))
    return asked


def _read(path: Path, what: str, limit: int) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise CertsFailed(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise CertsFailed(f"{what} {path} is larger than {limit} bytes")
    return data
