"""``controlplane ca``: init, rotate, prune, show, on a directory and on the Kubernetes Secret
(through the API server double); what it prints, errors included, never holds a key."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from controlplane import deploy
from controlplane.security import ca_cmd, castore
from controlplane.sources.kubernetes import api_client
from tests.kube.apiserver import ApiServerDouble


def run(capsys: pytest.CaptureFixture[str], *argv: str,
        kube: ca_cmd.ApiClientFactory | None = None) -> tuple[int, str, str]:
    code = ca_cmd.main(["ca", *argv], kube)
    out, err = capsys.readouterr()
    return code, out, err


def key_lines(folder: Path) -> list[str]:
    """The base64 lines of the CA key: none may be printed."""
    return [line for line in (folder / "ca.key").read_text().splitlines()
            if line and not line.startswith("-----")]


def assert_no_key(text: str, folder: Path | None = None,
                  keys: tuple[str, ...] | list[str] = ()) -> None:
    assert "PRIVATE KEY" not in text
    for line in [*(key_lines(folder) if folder else []), *keys]:
        assert line[:24] not in text


def test_init_show_rotate_prune_on_a_directory(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    folder = tmp_path / "ca"
    code, out, err = run(capsys, "init", "--ca-dir", str(folder), "--trust-domain", "prod.local")
    assert code == 0, err
    assert f"made a CA in the directory {folder}" in out and "serve --ca-dir" in out
    assert "controlplane root CA prod.local" in out
    first = key_lines(folder)
    assert_no_key(out + err, folder)

    code, out, err = run(capsys, "init", "--ca-dir", str(folder))
    assert code == 1 and "already holds a CA" in err and "ca show" in err

    code, out, err = run(capsys, "show", "--ca-dir", str(folder))
    assert code == 0 and "trusted roots (1)" in out
    assert_no_key(out + err, folder)
    shown = json.loads(run(capsys, "show", "--ca-dir", str(folder), "--json")[1])
    assert shown["signer"]["sha256"] == shown["roots"][0]["sha256"]

    code, out, err = run(capsys, "rotate", "--ca-dir", str(folder))
    assert code == 0, err
    assert "trusted roots (2)" in out and "ca prune" in out and "within 30 s" in out
    assert_no_key(out + err, folder, first)
    ca = castore.load_dir(folder, "cluster.local", datetime.datetime.now(datetime.UTC),
                          create=False)
    assert len(ca.roots) == 2

    code, out, err = run(capsys, "prune", "--ca-dir", str(folder))
    assert code == 0 and "trusted roots (1)" in out
    assert_no_key(out + err, folder, first)


def test_errors_say_what_to_do_and_show_no_key(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    code, _, err = run(capsys, "show", "--ca-dir", str(tmp_path / "none"))
    assert code == 1 and "controlplane ca init --ca-dir" in err
    code, _, err = run(capsys, "rotate", "--ca-dir", str(tmp_path / "none"))
    assert code == 1 and "ca init" in err
    folder = tmp_path / "ca"
    assert run(capsys, "init", "--ca-dir", str(folder))[0] == 0
    other = tmp_path / "other"
    assert run(capsys, "init", "--ca-dir", str(other))[0] == 0
    theirs = key_lines(other)
    (folder / "ca.key").write_bytes((other / "ca.key").read_bytes())  # not its key
    code, out, err = run(capsys, "show", "--ca-dir", str(folder))
    assert code == 1 and "does not belong to the CA certificate" in err
    assert_no_key(out + err, keys=theirs)
    (folder / "ca.key").write_text("-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqG"
                                   "SM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n")
    code, out, err = run(capsys, "rotate", "--ca-dir", str(folder))
    assert code == 1 and "not an unencrypted PEM private key" in err
    assert "MIGHAgEAMBMG" not in out + err
    with pytest.raises(SystemExit):
        ca_cmd.main(["ca", "show"])  # --ca-dir or --secret is required


def test_the_secret_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with ApiServerDouble(crd_installed=False) as api:
        config = api.kubeconfig(tmp_path / "kubeconfig")

        def kube(_: Path | None) -> object:
            return api_client(config)
        code, out, err = run(capsys, "init", "--secret", kube=kube)
        assert code == 0, err
        assert f"Secret {deploy.NAMESPACE}/controlplane-ca" in out
        code, out, err = run(capsys, "init", "--secret", kube=kube)
        assert code == 1 and "already holds a CA" in err
        code, out, err = run(capsys, "rotate", "--secret", kube=kube)
        assert code == 0 and "trusted roots (2)" in out, err
        code, out, err = run(capsys, "prune", "--secret", "controlplane-ca", kube=kube)
        assert code == 0 and "trusted roots (1)" in out, err
        code, out, err = run(capsys, "show", "--secret", kube=kube)
        assert code == 0 and "PRIVATE" not in out + err
        code, _, err = run(capsys, "show", "--secret")  # no client factory given
        assert code == 1 and "use --ca-dir" in err
