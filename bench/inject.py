"""Injection latency per pod: N AdmissionReview v1 requests over HTTPS to the webhook of a
running ``controlplane serve`` (a subprocess, its own CA and certificate in a directory),
one at a time on a kept-alive connection, as the API server sends them (a defaulted Pod
from a Deployment's ReplicaSet: generateName, ownerReferences, two containers with
probes and resources). Prints p50/p99 of the round trip seen by the client and of the
server's own decision time (its ``controlplane_injection_seconds`` histogram), and
writes the JSON under bench/results/runs/ (``--update-baseline``: bench/results/inject.json).

    .venv/bin/python bench/inject.py [--reviews 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from common import (
    BenchError,
    Deadline,
    add_output_flags,
    finish,
    metric,
)
from serverproc import ServerProcess, free_port

BASELINE = "inject.json"
HOST = "controlplane.controlplane-system.svc"  # the name the API server checks


def pod() -> dict[str, Any]:
    """A Pod as a ReplicaSet controller creates it, defaulted by the API server."""
    container = {
        "name": "reviews", "image": "registry.example/reviews:1.4.2",
        "imagePullPolicy": "IfNotPresent", "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "ports": [{"name": "http", "containerPort": 9080, "protocol": "TCP"}],
        "env": [{"name": "LOG_LEVEL", "value": "info"}],
        "resources": {"requests": {"cpu": "200m", "memory": "256Mi"},
                      "limits": {"memory": "512Mi"}},
        "readinessProbe": {"httpGet": {"path": "/health", "port": 9080, "scheme": "HTTP"},
                           "periodSeconds": 5, "timeoutSeconds": 1, "successThreshold": 1,
                           "failureThreshold": 3},
    }
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": "reviews-v1-7d9f8b6c5-", "namespace": "shop",
            "labels": {"app": "reviews", "version": "v1", "pod-template-hash": "7d9f8b6c5"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": "reviews-v1-7d9f8b6c5", "uid": str(uuid.uuid4()),
                                 "controller": True, "blockOwnerDeletion": True}]},
        "spec": {"containers": [container, {**container, "name": "log-shipper",
                                            "image": "registry.example/shipper:2",
                                            "ports": [], "readinessProbe": None}],
                 "serviceAccountName": "reviews", "restartPolicy": "Always",
                 "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst",
                 "schedulerName": "default-scheduler", "securityContext": {},
                 "enableServiceLinks": True, "preemptionPolicy": "PreemptLowerPriority",
                 "priority": 0},
    }


def review() -> dict[str, Any]:
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": str(uuid.uuid4()), "kind": gvk, "resource": gvr, "requestKind": gvk,
        "requestResource": gvr, "namespace": "shop", "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": pod(), "oldObject": None, "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}}}


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def histogram_quantile(samples: dict[str, float], name: str, q: float) -> float | None:
    """Prometheus' histogram_quantile on one scrape (bucket upper bound, interpolated)."""
    buckets = sorted((float(key.split('le="')[1].split('"')[0]), value)
                     for key, value in samples.items()
                     if key.startswith(name + "_bucket{") and 'le="+Inf"' not in key)
    total = metric(samples, name + "_count")
    if not buckets or not total:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            share = (rank - below) / max(count - below, 1e-9)
            return lower + (bound - lower) * share
        lower, below = bound, count
    return buckets[-1][0]


async def measure(server: ServerProcess, port: int, ca: bytes, reviews: int,
                  deadline: Deadline) -> dict[str, Any]:
    context = ssl.create_default_context(cadata=ca.decode())
    connector = aiohttp.TCPConnector(limit=1)  # one kept-alive connection, as a client would
    latencies: list[float] = []
    patch_bytes = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        for index in range(reviews + 20):  # the first 20 warm up (TLS, imports, caches)
            deadline.check(f"sending review {index}")
            body = json.dumps(review()).encode()
            started = time.perf_counter()
            async with session.post(f"https://127.0.0.1:{port}/inject", data=body,
                                    headers={"Content-Type": "application/json"},
                                    ssl=context, server_hostname=HOST) as response:
                answer = await response.json()
            elapsed = time.perf_counter() - started
            if response.status != 200 or "patch" not in answer.get("response", {}):
                raise BenchError(f"review {index}: {response.status} {str(answer)[:300]}")
            if index >= 20:
                latencies.append(elapsed)
                patch_bytes = len(base64.b64decode(answer["response"]["patch"]))
    samples = await server.metrics()
    decision = {q: histogram_quantile(samples, "controlplane_injection_seconds", q)
                for q in (0.5, 0.99)}
    injected = metric(samples, "controlplane_injections_total", 'result="injected"')
    return {
        "reviews": reviews,
        "round_trip_ms_p50": round(percentile(latencies, 0.5) * 1000, 3),
        "round_trip_ms_p99": round(percentile(latencies, 0.99) * 1000, 3),
        "round_trip_ms_mean": round(statistics.fmean(latencies) * 1000, 3),
        "server_decision_ms_p50": round((decision[0.5] or 0) * 1000, 3),
        "server_decision_ms_p99": round((decision[0.99] or 0) * 1000, 3),
        "server_injected_total": injected,
        "patch_bytes": patch_bytes,
        "server_rss_mib": round(server.memory_mib("VmRSS"), 1),
    }


def run(reviews: int, deadline_s: float) -> dict[str, Any]:
    deadline = Deadline(deadline_s)
    with tempfile.TemporaryDirectory(prefix="bench-inject-") as folder:
        work = Path(folder)
        (work / "mesh.yaml").write_text("services: []\n")
        port = free_port()
        server = ServerProcess(work / "mesh.yaml", work, env={
            "CONTROLPLANE_WEBHOOK_ADDRESS": f"127.0.0.1:{port}",
            "CONTROLPLANE_WEBHOOK_CERT_DIR": str(work / "certs")})
        server.start()
        try:
            server.wait_ready(deadline.left(60))
            while not (work / "certs" / "ca.crt").exists():
                deadline.check("waiting for the webhook's certificate")
                server.check_alive()
                time.sleep(0.05)
            time.sleep(0.2)  # the certificate is loaded right after it is written
            result = asyncio.run(measure(server, port, (work / "certs" / "ca.crt").read_bytes(),
                                         reviews, deadline))
        finally:
            server.stop()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reviews", type=int, default=1000,
                        help="AdmissionReviews measured (1000; 20 more warm up first)")
    parser.add_argument("--deadline", type=float, default=300.0,
                        help="seconds the whole run may take (300)")
    add_output_flags(parser, BASELINE)
    args = parser.parse_args(argv)
    if not 1 <= args.reviews <= 100_000:
        print("--reviews must be 1 to 100000", file=sys.stderr)
        return 2
    try:
        result = run(args.reviews, args.deadline)
    except BenchError as exc:
        result = {"error": str(exc)}
    return finish(result, args, BASELINE)


if __name__ == "__main__":
    sys.exit(main())
