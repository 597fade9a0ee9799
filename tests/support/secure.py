"""A secured mesh of real processes for the zero-trust end-to-end tests (issue 11).

The control plane runs ``serve --ca-dir`` in a temporary directory (its CA made on
first start, xDS over TLS, proxies authenticated by token); every sidecar is a real
Envoy bootstrapped by ``controlplane bootstrap --xds-ca --token-file --ca-dir
--service-account`` (xDS over TLS to the server, a token minted for its identity); apps
are HTTP backends that answer with the request headers they got, so a test sees what
the server-side sidecar forwarded (``x-forwarded-client-cert``: the caller's SPIFFE ID).

A test may also speak to a sidecar's inbound port itself: in plaintext (``call``,
``tcp_exchange``), or with mesh mTLS and a workload certificate of its choosing
(``SecureMesh.workload_files``, ``tcp_exchange``), which is how a TCP authorization rule
is exercised without an egress TCP listener.
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from controlplane.security import tokens
from controlplane.security.ca import CertificateAuthority
from controlplane.security.castore import load_dir
from controlplane.security.identity import SpiffeId
from tests.support.files import write_atomic
from tests.support.procs import ControlPlane, Envoy, stop_all, wait_for
from tests.support.threaded import QuietHttpServer, Served

TRUST_DOMAIN = "cluster.local"
MESH_ALPN = "controlplane-mtls"  # design: the ALPN a mesh mTLS client offers


def spiffe(service_account: str, namespace: str = "default") -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


class HeaderEcho(Served):
    """An HTTP app on 127.0.0.1 that answers every request with JSON: its own name, the
    method and path, and the request headers it received (lower-cased names)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits = 0
        lock = threading.Lock()
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                with lock:
                    app.hits += 1
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                body = json.dumps({
                    "backend": app.name, "method": self.command, "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_DELETE = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(QuietHttpServer(("127.0.0.1", 0), Handler))


class TcpEcho:
    """A TCP app on 127.0.0.1: a banner line with its name, then every byte echoed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = int(self.listener.getsockname()[1])
        self._open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self._open:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(f"{self.name}\n".encode())
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def stop(self) -> None:
        self._open = False
        self.listener.close()


@dataclass
class Answer:
    """One HTTP call's outcome: ``status`` 0 when the connection failed (``error``)."""

    status: int
    body: str = ""
    error: str = ""

    def json(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.body)
        return found

    @property
    def xfcc(self) -> str:
        """The x-forwarded-client-cert the app received ("" without one)."""
        return str(self.json()["headers"].get("x-forwarded-client-cert", ""))


def call(port: int, host: str, path: str = "/", method: str = "GET",
         headers: dict[str, str] | None = None, timeout: float = 5.0) -> Answer:
    """One plaintext HTTP/1.1 request to 127.0.0.1:``port`` (a sidecar's egress, or an
    inbound port directly); a refused or reset connection is an Answer with status 0."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Host": host, **(headers or {})})
        response = conn.getresponse()
        return Answer(response.status, response.read().decode(errors="replace"))
    except (OSError, http.client.HTTPException) as exc:
        return Answer(0, error=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def write_mesh(path: Path, mesh: dict[str, Any]) -> None:
    write_atomic(path, yaml.safe_dump(mesh, sort_keys=False))


def envoy_certs(envoy: Envoy) -> list[dict[str, Any]]:
    """The certificates Envoy holds (``/certs``): one entry per chain, each with its
    ``serial_number`` and its URI SANs (``uris``), CA certificates left out."""
    status, body, _ = envoy.admin("/certs")
    assert status == 200, body
    held = []
    for entry in json.loads(body).get("certificates", []):
        for cert in entry.get("cert_chain", []) or []:
            uris = [san["uri"] for san in cert.get("subject_alt_names", []) if "uri" in san]
            held.append({"serial_number": cert.get("serial_number", ""), "uris": uris,
                         "expiration_time": cert.get("expiration_time", "")})
    return held


def envoy_ca_certs(envoy: Envoy) -> list[str]:
    """The serial numbers of the CA certificates (trust bundle) Envoy reports."""
    status, body, _ = envoy.admin("/certs")
    assert status == 200, body
    return [cert.get("serial_number", "") for entry in json.loads(body).get("certificates", [])
            for cert in entry.get("ca_cert", []) or []]


def own_serials(envoy: Envoy, identity: str) -> set[str]:
    """The serial numbers of the certificates Envoy holds for ``identity``."""
    return {c["serial_number"] for c in envoy_certs(envoy) if identity in c["uris"]}


def stats_matching(envoy: Envoy, *words: str) -> dict[str, int]:
    """Every counter of Envoy whose name holds all of ``words``."""
    _, body, _ = envoy.admin("/stats")
    found = {}
    for line in body.splitlines():
        name, _, value = line.partition(": ")
        if all(word in name for word in words) and value.strip().isdigit():
            found[name] = int(value)
    return found


class SecureMesh:
    """One secured mesh in ``tmp``: the server with its CA directory, sidecars with
    minted tokens, apps; ``close`` ends every process started here."""

    def __init__(self, tmp: Path, cert_ttl: str | None = None,
                 server_extra: list[str] | None = None) -> None:
        self.tmp = tmp
        self.ca_dir = tmp / "ca"
        self.mesh_path = tmp / "mesh.yaml"
        self.cert_ttl = cert_ttl
        self.server_extra = server_extra or []
        self.server_env: dict[str, str] = {}
        self.server: ControlPlane | None = None
        self.envoys: list[Envoy] = []
        self.apps: list[HeaderEcho | TcpEcho] = []

    # -- processes ---------------------------------------------------------------------

    def serve(self, mesh: dict[str, Any]) -> ControlPlane:
        write_mesh(self.mesh_path, mesh)
        extra = ["--ca-dir", str(self.ca_dir), *self.server_extra]
        if self.cert_ttl is not None:
            extra += ["--workload-cert-ttl", self.cert_ttl]
        self.server = ControlPlane(self.mesh_path, self.tmp, extra=extra,
                                   env=self.server_env).start()
        wait_for(lambda: (self.ca_dir / "ca.crt").exists(), what="the server's CA files")
        return self.server

    def update(self, mesh: dict[str, Any]) -> None:
        write_mesh(self.mesh_path, mesh)

    def http_app(self, name: str) -> HeaderEcho:
        app = HeaderEcho(name)
        self.apps.append(app)
        return app

    def tcp_app(self, name: str) -> TcpEcho:
        app = TcpEcho(name)
        self.apps.append(app)
        return app

    @property
    def bundle(self) -> Path:
        """The trust bundle a sidecar needs to verify the server (roots.pem, else the
        CA certificate alone), copied beside the sidecars' files."""
        source = self.ca_dir / "roots.pem"
        if not source.exists():
            source = self.ca_dir / "ca.crt"
        copy = self.tmp / "xds-bundle.pem"
        copy.write_bytes(source.read_bytes())
        return copy

    def sidecar(self, node_id: str, service: str, service_account: str, delta: bool,
                app_port: int | None = None, extra: list[str] | None = None) -> Envoy:
        """A real Envoy for ``service`` running as ``service_account``, bootstrapped with
        xDS over TLS and a token minted from the CA directory (bound to its node id)."""
        assert self.server is not None, "serve() first: the CA is made on its first start"
        token = self.token_path(node_id)
        envoy = Envoy(self.tmp, node_id, service, self.server.xds_port, delta,
                      extra=["--xds-ca", str(self.bundle), "--token-file", str(token),
                             "--ca-dir", str(self.ca_dir),
                             "--service-account", service_account, *(extra or [])],
                      app_port=app_port)
        self.envoys.append(envoy)
        envoy.start()
        return envoy

    def close(self) -> None:
        stop_all(self.envoys, self.server, self.apps)

    # -- the CA, for a test's own mTLS client --------------------------------------------

    def authority(self) -> CertificateAuthority:
        """The server's CA, read from its directory (never created here)."""
        return load_dir(self.ca_dir, TRUST_DOMAIN, datetime.now(UTC), create=False)

    def token_path(self, node_id: str) -> Path:
        return self.tmp / f"{node_id}.token"

    def write_token(self, node_id: str, service_account: str, issued: datetime,
                    ttl: timedelta) -> None:
        """Replace a sidecar's token file (as a rotation does) with one minted now, for
        its node, issued at ``issued`` and valid ``ttl`` from then (expired if so)."""
        token = tokens.mint(self.authority(), SpiffeId(TRUST_DOMAIN, "default",
                                                       service_account),
                            node_id, issued, ttl)
        write_atomic(self.token_path(node_id), token)

    def workload_files(self, service_account: str, namespace: str = "default") -> TlsFiles:
        """A workload certificate for ``namespace/service_account`` from the mesh CA, as
        files an ssl context loads: a client that is that identity."""
        ca = self.authority()
        issued = ca.issue_workload(SpiffeId(TRUST_DOMAIN, namespace, service_account),
                                   datetime.now(UTC), timedelta(hours=1))
        stem = self.tmp / f"client-{namespace}-{service_account}"
        cert, key, roots = (stem.with_suffix(".crt"), stem.with_suffix(".key"),
                            stem.with_suffix(".roots"))
        cert.write_bytes(issued.cert_pem)
        key.write_bytes(issued.key_pem)
        roots.write_bytes(ca.bundle_pem)
        return TlsFiles(cert, key, roots)


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    roots: Path

    def context(self) -> ssl.SSLContext:
        """Mesh mTLS as a sidecar speaks it: our certificate, the mesh roots, the mesh
        ALPN. The peer is checked by its SPIFFE ID (``peer_uris``), not by host name."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(self.roots))
        context.load_cert_chain(str(self.cert), str(self.key))
        context.set_alpn_protocols([MESH_ALPN])
        return context


def peer_uris(conn: ssl.SSLSocket) -> list[str]:
    cert: dict[str, Any] = dict(conn.getpeercert() or {})
    return [str(value) for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]


def peer_serial(conn: ssl.SSLSocket) -> int:
    cert: dict[str, Any] = dict(conn.getpeercert() or {})
    return int(str(cert["serialNumber"]), 16)


@dataclass
class TcpOutcome:
    """What a TCP client saw: the lines read back, and whether the peer closed."""

    peer: list[str]
    lines: list[str]
    closed: bool
    error: str = ""


def tcp_exchange(port: int, files: TlsFiles | None, send: list[str],
                 timeout: float = 5.0) -> TcpOutcome:
    """Connect to 127.0.0.1:``port`` (mesh mTLS with ``files``, else plaintext), send
    each line at once, then read the banner and the echoes until the peer closes. Sending
    first matters: a TLS-only listener waits for the client's first bytes to choose."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn: socket.socket = raw
    peer: list[str] = []
    lines: list[str] = []
    try:
        if files is not None:
            try:
                tls = files.context().wrap_socket(raw)
            except (OSError, ssl.SSLError) as exc:
                return TcpOutcome(peer, lines, closed=True, error=f"handshake: {exc}")
            conn, peer = tls, peer_uris(tls)
        try:
            conn.sendall("".join(f"{line}\n" for line in send).encode())
        except OSError as exc:
            return TcpOutcome(peer, lines, closed=True, error=f"send: {exc}")
        reader = conn.makefile("rb")
        while len(lines) < len(send) + 1:
            try:
                line = reader.readline()
            except (OSError, ssl.SSLError) as exc:
                # a reset is a close; a timeout is not (the peer kept it open)
                closed = not isinstance(exc, TimeoutError)
                return TcpOutcome(peer, lines, closed=closed, error=f"read: {exc}")
            if not line:
                return TcpOutcome(peer, lines, closed=True)
            lines.append(line.decode().strip())
        return TcpOutcome(peer, lines, closed=False)
    finally:
        conn.close()
