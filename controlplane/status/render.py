"""The proxies as a table or JSON (plain functions: rows in, text out)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from controlplane.status.model import COLUMNS, ProxyStatus

HEADERS = ("NODE", "SERVICE", "NAMESPACE", "PROTOCOL", *(c.upper() for c in COLUMNS),
           "REPLICA")
MAX_ERROR_SHOWN = 300


def table(proxies: Sequence[ProxyStatus]) -> str:
    """Aligned columns, one proxy per line; NACK errors listed below the table."""
    lines = [list(HEADERS)]
    for proxy in proxies:
        cells = [proxy.node_id, proxy.service, proxy.namespace, proxy.protocol]
        cells += [proxy.types[c].shown if c in proxy.types else "-" for c in COLUMNS]
        lines.append([*cells, proxy.replica])
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
            .rstrip() for line in lines]
    errors = [f"{proxy.node_id} {name}: {view.error[:MAX_ERROR_SHOWN]}"
              for proxy in proxies for name, view in proxy.types.items() if view.error]
    if errors:
        text += ["", "NACKed (the proxy keeps its last good config):", *errors]
    return "\n".join(text) + "\n"


def as_json(proxies: Sequence[ProxyStatus], unreachable: Sequence[str]) -> str:
    body = {"proxies": [proxy.as_dict() for proxy in proxies],
            "synced": all(proxy.synced for proxy in proxies),
            "unreachable": list(unreachable)}
    return json.dumps(body, indent=2) + "\n"
