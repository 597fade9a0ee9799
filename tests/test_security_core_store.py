"""Where the CA is kept: a directory made on first start and kept, the operator's files,
a Kubernetes Secret in cert-manager's format shared by replicas (through the API server
double, with its concurrency and RBAC); rotation keeps the old root trusted until pruned."""

from __future__ import annotations

import base64
import datetime
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from kubernetes import client

from controlplane import deploy
from controlplane.security import castore, tokens
from controlplane.security.ca import CertificateAuthority, Issued
from controlplane.security.castore import CaError
from controlplane.security.identity import SpiffeId
from controlplane.sources.kubernetes import api_client
from controlplane.sources.kubernetes.kinds import SECRETS
from tests.kube.apiserver import ApiServerDouble
from tests.kube.rbac import Rbac

NOW = datetime.datetime(2026, 12, 1, 6, 0, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)
TD = "cluster.local"
RATINGS = SpiffeId(TD, "default", "ratings")
NS = deploy.NAMESPACE


def verifies(ca: CertificateAuthority | list[x509.Certificate], issued: Issued) -> bool:
    """As a peer trusting ``ca``'s bundle (or just these roots) would."""
    roots = list(ca.roots) if isinstance(ca, CertificateAuthority) else ca
    certs = x509.load_pem_x509_certificates(issued.cert_pem)
    verifier = PolicyBuilder().store(Store(roots)).time(NOW).build_client_verifier()
    try:
        verifier.verify(certs[0], certs[1:])
    except VerificationError:
        return False
    return True


# --- a directory ----------------------------------------------------------------------------


def test_a_directory_ca_is_made_once_and_kept(tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    made = castore.load_dir(folder, TD, NOW)
    assert (folder / "ca.key").stat().st_mode & 0o777 == 0o600
    assert folder.stat().st_mode & 0o077 == 0
    assert (folder / "roots.pem").read_bytes() == made.bundle_pem
    again = castore.load_dir(folder, TD, NOW + HOUR)
    assert again.version == made.version
    assert verifies(again, made.issue_workload(RATINGS, NOW, HOUR))


def test_processes_starting_together_make_one_ca(tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    found: list[str] = []
    barrier = threading.Barrier(6, timeout=10)

    def start() -> None:
        barrier.wait()
        found.append(castore.load_dir(folder, TD, NOW).version)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(found) == 6 and len(set(found)) == 1


def test_a_missing_or_half_ca_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(CaError, match="controlplane ca init --ca-dir"):
        castore.load_dir(tmp_path / "none", TD, NOW, create=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaError, match="holds no CA: make one with `controlplane ca init"):
        castore.load_dir(tmp_path / "empty", TD, NOW, create=False)
    half = tmp_path / "half"
    castore.load_dir(half, TD, NOW)
    (half / "ca.key").unlink()
    with pytest.raises(CaError, match=r"has ca.crt but no ca.key: restore it"):
        castore.load_dir(half, TD, NOW)
    wrong = tmp_path / "wrong"
    castore.load_dir(wrong, TD, NOW)
    key = (half / "ca.crt").read_bytes()  # a certificate where the key should be
    (wrong / "ca.key").write_bytes(key)
    with pytest.raises(CaError, match="not an unencrypted PEM private key") as caught:
        castore.load_dir(wrong, TD, NOW)
    assert str(wrong) in str(caught.value)


def test_rotation_keeps_the_old_root_trusted_until_pruned(tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    old = castore.load_dir(folder, TD, NOW)
    before = old.issue_workload(RATINGS, NOW, HOUR)
    token = tokens.mint(old, RATINGS, None, NOW, HOUR)
    new = castore.rotate_dir(folder, TD, NOW)
    assert new.signer_cert != old.signer_cert
    assert new.roots == (new.signer_cert, old.signer_cert)
    assert castore.load_dir(folder, TD, NOW).version == new.version  # what the server reads
    after = new.issue_workload(RATINGS, NOW, HOUR)
    assert verifies(new, before) and verifies(new, after)  # both trusted while migrating
    # A peer not yet sent the new bundle (or a bootstrap's --xds-ca) still trusts only the
    # old root: the chain carries the new root cross-signed by the old one.
    assert len(x509.load_pem_x509_certificates(after.cert_pem)) == 2
    assert verifies([old.signer_cert], after) and verifies([new.signer_cert], after)
    again = castore.rotate_dir(folder, TD, NOW)  # twice before a prune: still one path
    third = again.issue_workload(RATINGS, NOW, HOUR)
    assert all(verifies([root], third) for root in (old.signer_cert, new.signer_cert,
                                                    again.signer_cert))
    assert len(again.roots) == 3
    new = again
    assert tokens.verify(new, token, NOW).identity == RATINGS
    pruned = castore.prune_dir(folder)
    assert pruned.roots == (new.signer_cert,) and pruned.chain == ()
    assert (folder / "roots.pem").read_bytes() == pruned.bundle_pem
    assert verifies(pruned, third) and not verifies(pruned, before)
    assert not verifies([old.signer_cert], pruned.issue_workload(RATINGS, NOW, HOUR))
    with pytest.raises(Exception, match="not signed by"):
        tokens.verify(pruned, token, NOW)


def test_operator_files_are_used_as_given(tmp_path: Path) -> None:
    castore.load_dir(tmp_path / "theirs", TD, NOW)
    ca = castore.load_files(tmp_path / "theirs" / "ca.crt", tmp_path / "theirs" / "ca.key")
    assert ca.roots == (ca.signer_cert,)
    with pytest.raises(CaError, match=r"cannot read --ca-key .*no.key") as caught:
        castore.load_files(tmp_path / "theirs" / "ca.crt", tmp_path / "no.key")
    assert "PRIVATE" not in str(caught.value)
    with pytest.raises(CaError, match=r"--ca-cert.*does not belong to the CA certificate"):
        castore.load_dir(tmp_path / "other", TD, NOW)
        castore.load_files(tmp_path / "theirs" / "ca.crt", tmp_path / "other" / "ca.key")


# --- a Kubernetes Secret ----------------------------------------------------------------------


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    double = ApiServerDouble(crd_installed=False).start()
    yield double
    double.stop()


def core(api: ApiServerDouble, tmp_path: Path) -> client.CoreV1Api:
    return client.CoreV1Api(api_client(api.kubeconfig(tmp_path / "kubeconfig")))


def test_replicas_racing_share_one_ca_secret(api: ApiServerDouble, tmp_path: Path) -> None:
    found: list[str] = []
    barrier = threading.Barrier(4, timeout=10)

    def replica(own: client.CoreV1Api) -> None:
        barrier.wait()
        found.append(castore.load_secret(own, NS, trust_domain=TD, now=NOW).version)

    threads = [threading.Thread(target=replica, args=(core(api, tmp_path),))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(found) == 4 and len(set(found)) == 1
    assert api.count("create", SECRETS) >= 1
    stored = api.get(SECRETS, NS, "controlplane-ca")
    assert stored["type"] == "kubernetes.io/tls"
    assert set(stored["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    ca = castore.load_secret(core(api, tmp_path), NS, create=False)
    assert ca.version == found[0]
    assert base64.b64decode(stored["data"]["ca.crt"]) == ca.bundle_pem


def test_a_cert_manager_secret_is_used_as_is_and_rotated_there(
        api: ApiServerDouble, tmp_path: Path) -> None:
    pems = castore.new_pems(TD, NOW)
    body = castore._body(NS, "controlplane-ca", pems)
    body["metadata"]["annotations"] = {"cert-manager.io/certificate-name": "mesh-ca"}
    api.create(body)
    ca = castore.load_secret(core(api, tmp_path), NS, create=False)
    assert ca.bundle_pem == pems.cert
    with pytest.raises(CaError, match=r"is cert-manager's .*cmctl renew"):
        castore.rotate_secret(core(api, tmp_path), NS, "controlplane-ca", TD, NOW)
    # Another name needs the RBAC for it (the shipped one names controlplane-ca only).
    with pytest.raises(CaError, match="needs secrets get/update on mesh-ca"):
        castore.load_secret(core(api, tmp_path), NS, "mesh-ca", create=False)


def test_a_secret_rotation_then_prune(api: ApiServerDouble, tmp_path: Path) -> None:
    old = castore.load_secret(core(api, tmp_path), NS, trust_domain=TD, now=NOW)
    new = castore.rotate_secret(core(api, tmp_path), NS, "controlplane-ca", TD, NOW)
    assert new.roots == (new.signer_cert, old.signer_cert)
    assert castore.load_secret(core(api, tmp_path), NS, create=False).version == new.version
    pruned = castore.prune_secret(core(api, tmp_path), NS, "controlplane-ca")
    assert pruned.roots == (new.signer_cert,)
    assert api.count("update", SECRETS) == 2


def test_without_the_rbac_or_a_secret_the_error_says_what_to_do(tmp_path: Path) -> None:
    with (ApiServerDouble(crd_installed=False, rbac=Rbac(rules=[])) as api,
          pytest.raises(CaError, match="secrets get/update on controlplane-ca and create")):
        castore.load_secret(core(api, tmp_path), NS, trust_domain=TD, now=NOW)
    with ApiServerDouble(crd_installed=False) as api:
        with pytest.raises(CaError, match="ca init --secret controlplane-ca"):
            castore.load_secret(core(api, tmp_path), NS, create=False)
        api.create({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                    "metadata": {"name": "controlplane-ca", "namespace": NS},
                    "data": {"tls.crt": base64.b64encode(b"junk").decode()}})
        with pytest.raises(CaError, match=r"has no tls.crt and tls.key"):
            castore.load_secret(core(api, tmp_path), NS, create=False)


def test_a_server_polling_during_rotations_never_reads_half_a_ca(tmp_path: Path) -> None:
    """``ca rotate`` rewrites three files; the server's poll reads them under a shared
    lock, so it sees the CA before or after, never a certificate with the other's key."""
    folder = tmp_path / "ca"
    castore.load_dir(folder, TD, NOW)
    stop = threading.Event()
    errors: list[Exception] = []
    seen: set[str] = set()

    def poll() -> None:
        while not stop.is_set():
            try:
                seen.add(castore.load_dir(folder, TD, NOW, create=False).version)
            except Exception as exc:
                errors.append(exc)

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for _ in range(15):
            castore.rotate_dir(folder, TD, NOW)
            castore.prune_dir(folder)
    finally:
        stop.set()
        reader.join(30)
    assert errors == [] and len(seen) >= 2
