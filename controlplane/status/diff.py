"""``controlplane status --node ID``: per type, what the server serves the proxy against
what the proxy last ACKed, by resource name, from one CSDS answer with contents.

The server sends each served resource with the version it sent, and, for a resource the
proxy holds in another content, a second entry with the version the proxy ACKed
(server/csds_config.py): served = the entries of the sent version that the proxy does not
hold already, held = the entries marked ACKED.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field

from envoy.admin.v3 import config_dump_shared_pb2
from envoy.service.status.v3 import csds_pb2
from google.protobuf import any_pb2

from controlplane import resource
from controlplane.status.model import ProxyStatus, proxy_status, to_json

_ACKED = config_dump_shared_pb2.ClientResourceStatus.Value("ACKED")
MAX_DIFF_LINES = 40


@dataclass
class TypeDiff:
    name: str
    status: str
    error: str
    sent_version: str
    acked_version: str
    held_known: bool
    added: list[str] = field(default_factory=list)  # served, not held
    removed: list[str] = field(default_factory=list)  # held, no longer served
    changed: dict[str, list[str]] = field(default_factory=dict)  # name -> diff lines


def diff(config: csds_pb2.ClientConfig, address: str) -> tuple[ProxyStatus, list[TypeDiff]]:
    proxy = proxy_status(config, address)
    served: dict[str, dict[str, any_pb2.Any]] = {}
    held: dict[str, dict[str, any_pb2.Any]] = {}
    for entry in config.generic_xds_configs:
        name = resource.short_name(entry.type_url)
        view = proxy.types.get(name)
        if view is None or not entry.name:
            continue
        if entry.version_info == view.sent_version:
            served.setdefault(name, {})[entry.name] = entry.xds_config
        if entry.client_status == _ACKED:
            held.setdefault(name, {})[entry.name] = entry.xds_config
    result = []
    for name, view in proxy.types.items():
        mine, theirs = served.get(name, {}), held.get(name, {})
        found = TypeDiff(name, view.shown, view.error, view.sent_version, view.acked_version,
                         view.held_known)
        if view.held_known:
            found.added = sorted(mine.keys() - theirs.keys())
            found.removed = sorted(theirs.keys() - mine.keys())
            found.changed = {key: _lines(theirs[key], mine[key])
                             for key in sorted(mine.keys() & theirs.keys())
                             if mine[key].value != theirs[key].value}
        result.append(found)
    return proxy, result


def _lines(old: any_pb2.Any, new: any_pb2.Any) -> list[str]:
    import controlplane.translator  # noqa: F401 (registers every type a resource nests)

    before = json.dumps(to_json(old), indent=1, sort_keys=True).splitlines()
    after = json.dumps(to_json(new), indent=1, sort_keys=True).splitlines()
    lines = [line for line in difflib.unified_diff(before, after, "acked", "served",
                                                   lineterm="", n=1)]
    return lines[:MAX_DIFF_LINES] + ([f"... {len(lines) - MAX_DIFF_LINES} more lines"]
                                     if len(lines) > MAX_DIFF_LINES else [])


def render(proxy: ProxyStatus, diffs: list[TypeDiff]) -> str:
    out = [f"{proxy.node_id} ({proxy.service}.{proxy.namespace}, {proxy.protocol}) on "
           f"{proxy.replica}"]
    for each in diffs:
        head = f"{each.name.upper()}: {each.status}"
        if each.sent_version != each.acked_version:
            head += (f" (served version {each.sent_version or '-'}, ACKed "
                     f"{each.acked_version or 'none'})")
        out.append(head)
        if each.error:
            out.append(f"  NACK: {each.error}")
        if not each.held_known:
            out.append("  what the proxy holds is not known to this replica (it reconnected "
                       "since its last ACK); its next ACK tells")
            continue
        out += [f"  + {name}  (served, not ACKed)" for name in each.added]
        out += [f"  - {name}  (ACKed, no longer served)" for name in each.removed]
        for name, lines in each.changed.items():
            out.append(f"  ~ {name}  (changed)")
            out += [f"      {line}" for line in lines]
        if not (each.added or each.removed or each.changed):
            out.append("  the proxy holds what the server serves")
    return "\n".join(out) + "\n"
