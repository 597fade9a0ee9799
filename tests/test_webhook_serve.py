"""``controlplane serve --source kubernetes`` as the Deployment runs it (a process, its
webhook settings from the environment as deploy/kubernetes sets them), against the API
server double: it keeps its certificate in the Secret, writes the CA into the webhook
configuration, injects a pod over HTTPS, counts it on /metrics, and stops on SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane import deploy
from controlplane.sources.kubernetes.kinds import CA_SECRET, SECRETS, WEBHOOK_SECRET
from tests.kube.apiserver import ApiServerDouble
from tests.support.admission import (
    app_pod,
    ca_bundle,
    client_context,
    patched,
    review_request,
    send,
    webhook_api,
)
from tests.support.procs import free_port, wait_for


@pytest.fixture
def api() -> Iterator[ApiServerDouble]:
    with webhook_api() as double:
        yield double


def environment(deployed: dict[str, str], **more: str) -> dict[str, str]:
    """The Deployment's env (its fieldRef resolved as the kubelet would), and ``more``."""
    (container,) = deploy.deployment()["spec"]["template"]["spec"]["containers"]
    env = {**os.environ}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            assert entry["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
            env[entry["name"]] = deploy.NAMESPACE
    env.update(deployed)
    env.update(more)
    return env


async def test_serve_in_a_cluster_injects_pods(api: ApiServerDouble, tmp_path: Path) -> None:
    webhook_port, admin_port = free_port(), free_port()
    env = environment({"CONTROLPLANE_WEBHOOK_ADDRESS": f"127.0.0.1:{webhook_port}"},
                      CONTROLPLANE_LOG_FORMAT="json")
    log = tmp_path / "serve.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "controlplane", "serve", "--source", "kubernetes",
             "--kubeconfig", str(api.kubeconfig(tmp_path / "kubeconfig")),
             "--xds-address", "127.0.0.1:0", "--admin-address", f"127.0.0.1:{admin_port}",
             "--snapshot-keep", "0"],
            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=tmp_path)
    try:
        wait_for(lambda: WEBHOOK_SECRET in {s["metadata"]["name"] for s in api.objects(SECRETS)}
                 and ca_bundle(api), timeout=30,
                 what="the Secret and the caBundle")
        # The webhook's own Secret (beside the mesh CA's, when the server runs one).
        assert WEBHOOK_SECRET in {s["metadata"]["name"] for s in api.objects(SECRETS)}
        pod = app_pod("reviews")
        async with aiohttp.ClientSession() as session:
            response: dict[str, Any] | None = None
            last: Exception | None = None
            for _ in range(50):  # the certificate is loaded right after it is written
                try:
                    response = await send(session, webhook_port, review_request(pod),
                                          client_context(ca_bundle(api)))
                    break
                except aiohttp.ClientError as exc:
                    last = exc
                    await asyncio.sleep(0.1)
            assert response is not None, last
        injected = patched(pod, response)
        proxy = next(c for c in injected["spec"]["initContainers"]
                     if c["name"] == "controlplane-proxy")
        # The sidecars dial the Service the manifests define, as the Deployment's env says.
        assert deploy.SERVICE_ADDRESS.split(":")[0] in json.dumps(proxy)
        # Over TLS, verifying the mesh CA the server keeps in its Secret, with the pod's
        # projected token: the server's default in a cluster.
        ca = next(item for item in api.objects(SECRETS)
                  if item["metadata"]["name"] == CA_SECRET)
        google = yaml.safe_load(proxy["args"][1])["dynamic_resources"]["ads_config"][
            "grpc_services"][0]["google_grpc"]
        assert google["channel_credentials"]["ssl_credentials"]["root_certs"][
            "inline_string"] == base64.b64decode(ca["data"]["ca.crt"]).decode()
        assert google["call_credentials"][0]["from_plugin"]["typed_config"][
            "secret_data"] == {"filename": "/var/run/secrets/controlplane/token"}
        assert injected["spec"]["volumes"][-1]["projected"]["sources"] == [
            {"serviceAccountToken": {"audience": "controlplane", "expirationSeconds": 3600,
                                     "path": "token"}}]
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics",
                                    timeout=5) as answer:
            metrics = answer.read().decode()
        assert 'controlplane_injections_total{result="injected"} 1.0' in metrics
        assert "controlplane_injection_seconds_count 1.0" in metrics
        expiry = next(line for line in metrics.splitlines() if line.startswith(
            "controlplane_webhook_certificate_expiry_timestamp_seconds "))
        assert float(expiry.split()[1]) > time.time() + 300 * 86400
    finally:
        server.terminate()
        code = server.wait(20)
    lines = [json.loads(line) for line in log.read_text().splitlines()
             if line.startswith("{")]
    events = {line["event"] for line in lines}
    assert {"webhook.started", "webhook.certificate_made", "webhook.ca_bundle_written",
            "webhook.decision", "serve.stopped"} <= events, events
    assert code == 0
    assert "PRIVATE KEY" not in log.read_text()
