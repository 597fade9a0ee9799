"""The snapshot store at many groups: a big shared layer is written once, in a file of
its own that the groups' files name, and goes when no stored group file names it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from controlplane import resource
from controlplane.cache import SnapshotCache
from controlplane.cache.store import INLINE, LAYERS, SnapshotStore
from controlplane.mesh import load_mesh_text
from controlplane.pipeline import Pipeline
from controlplane.proxy import ProxyIdentity

SERVICES = 450  # enough for the clusters, endpoints and route layers to pass INLINE


def _mesh(port: int) -> Any:
    return load_mesh_text("services:\n" + "".join(
        f"  - {{name: svc-{i:03d}, port: 9080, endpoints: [{{address: 10.0.{i // 200}."
        f"{i % 200 + 1}, port: {port if i == 0 else 8080}}}]}}\n" for i in range(SERVICES)))


def _proxies() -> list[ProxyIdentity]:
    return [ProxyIdentity(node_id=f"n{i}", service=f"svc-{i:03d}", inbound_port=15006,
                          app_port=8080) for i in range(3)]


def _read(store: SnapshotStore, proxy: ProxyIdentity) -> tuple[dict[str, Any], Path]:
    [path] = sorted(store.folder(proxy.group).glob("*.json"))[-1:]
    return json.loads(path.read_text()), path


def _whole(store: SnapshotStore, stored: dict[str, Any]) -> dict[str, set[str]]:
    """Every resource name a stored group file holds, its layer files included."""
    names: dict[str, set[str]] = {}
    for short, items in stored["resources"].items():
        names.setdefault(short, set()).update(i.get("name") or i["cluster_name"]
                                              for i in items)
    for short, files in stored.get("layers", {}).items():
        for name in files:
            layer = json.loads((store.directory / LAYERS / name).read_text())
            assert layer["type"] == short
            names.setdefault(short, set()).update(i.get("name") or i["cluster_name"]
                                                  for i in layer["resources"])
    return names


def test_big_shared_layers_are_stored_once_and_named(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=1)
    cache = SnapshotCache()
    pipeline = Pipeline(cache, store)
    assert pipeline.set_mesh(_mesh(8080))
    proxies = _proxies()
    for proxy in proxies:
        cache.connect(proxy)  # no event loop here: each is built and stored at once
    assert pipeline.set_mesh(_mesh(8081))
    store.close()
    layers = sorted(p.name for p in (tmp_path / LAYERS).iterdir())
    assert [n.split("-")[0] for n in layers] == ["cds", "eds", "rds"]  # one each, shared
    for proxy in proxies:
        stored, path = _read(store, proxy)
        snapshot = cache.get(proxy.group)
        assert snapshot is not None and stored["version"] == snapshot.version
        assert path.stat().st_size < INLINE  # its own resources only
        assert sorted(f for fs in stored["layers"].values() for f in fs) == layers
        expected = {resource.short_name(t): set(typed.resources)
                    for t, typed in snapshot.types.items()}
        assert {k: v for k, v in _whole(store, stored).items() if v} == {
            k: v for k, v in expected.items() if v}
    # The endpoint change wrote one new eds layer file; the old one went with the last
    # group file that named it (keep=1).
    eds = json.loads((tmp_path / LAYERS / layers[1]).read_text())
    first = next(i for i in eds["resources"] if i["cluster_name"].startswith(
        "outbound|9080||svc-000."))
    assert first["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"]["port_value"] == 8081
    # Groups gone: their files, then the layer files nobody names.
    later = SnapshotStore(tmp_path, keep=1)
    for proxy in proxies[:2]:
        later.forget(proxy.group)
    later.close()
    assert sorted(p.name for p in (tmp_path / LAYERS).iterdir()) == layers  # one left
    last = SnapshotStore(tmp_path, keep=1)
    last.forget(proxies[2].group)
    last.close()
    assert not (tmp_path / LAYERS).exists()


def test_a_restarted_store_keeps_what_old_files_name_and_drops_orphans(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=2)
    cache = SnapshotCache()
    pipeline = Pipeline(cache, store)
    assert pipeline.set_mesh(_mesh(8080))
    [proxy] = _proxies()[:1]
    cache.connect(proxy)
    store.close()
    named = sorted(p.name for p in (tmp_path / LAYERS).iterdir())
    orphan = tmp_path / LAYERS / "eds-0000000000000000.json"
    orphan.write_text("{}")
    again = SnapshotStore(tmp_path, keep=2)
    pipeline.store = again
    assert pipeline.set_mesh(_mesh(8081))  # a new version: counted with the old files
    again.close()
    assert not orphan.exists()
    now = {p.name for p in (tmp_path / LAYERS).iterdir()}
    assert set(named) <= now  # the older group file (kept) still names them
    stored, _ = _read(again, proxy)
    assert _whole(again, stored)["eds"]
