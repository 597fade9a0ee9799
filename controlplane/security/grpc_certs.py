"""Where a proxyless gRPC client's mesh certificates live, and how its bootstrap and
its clusters name them (gRFC A29).

gRPC reads certificates only through the certificate providers of its bootstrap, never
over SDS. ``controlplane certs`` fetches the workload's certificate over SDS (as a
sidecar would) and writes these files; ``bootstrap --grpc --cert-dir`` points gRPC's
``file_watcher`` provider at them under ``PROVIDER_INSTANCE``; the clusters the server
sends such a client name that instance. One shared module, so the three agree.
"""

from __future__ import annotations

from typing import Final

PROVIDER_INSTANCE: Final = "mesh"
"""The ``certificate_providers`` key in the bootstrap, the ``instance_name`` in CDS."""
CERT_FILE: Final = "cert.pem"  # the workload's certificate chain
KEY_FILE: Final = "key.pem"  # its private key (0600)
CA_FILE: Final = "ca.pem"  # the mesh trust bundle
REFRESH_INTERVAL: Final = "60s"
"""How often gRPC reads the files again (``file_watcher``'s ``refresh_interval``)."""
NODE_FLAG: Final = "certificates"
"""Node metadata saying the client has the files (``"true"``): its clusters may use mTLS."""
