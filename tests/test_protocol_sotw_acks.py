"""A state-of-the-world request handled from its bytes (most ACKs are recognized without
parsing them, sotw.py) is handled exactly as the same request parsed: same kind, same
pushes, same stream state, whatever the client sends. Only an ACK of the last push with
the names of the last request takes the short way; everything else is parsed."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane import resource
from controlplane.server import requests, sotw
from controlplane.server.sotw import SotwStream
from controlplane.server.stream import Handled, ProtocolError
from tests.support.snapshots import snapshot
from tests.support.xds_client import node

NAMES = [f"c{i}" for i in range(6)]
TYPES = [resource.CLUSTER, resource.ENDPOINT, resource.LISTENER, resource.ROUTE]

# One step of a client: which type, which nonce and version, which names, what else.
steps = st.lists(st.fixed_dictionaries({
    "type": st.sampled_from(TYPES),
    "nonce": st.sampled_from(["last", "old", "none"]),
    "version": st.sampled_from(["sent", "other", "empty"]),
    "names": st.sampled_from(["same", "fewer", "more", "reversed", "none"]),
    "extra": st.sampled_from(["", "", "", "node", "error", "locator"]),
    "snapshot": st.booleans(),  # a new snapshot arrives after this request
}), min_size=1, max_size=25)


def _request(stream: SotwStream, step: dict[str, Any],
             last_names: dict[str, list[str]]) -> discovery_pb2.DiscoveryRequest:
    type_url = step["type"]
    state = stream.types.get(type_url)
    names = last_names.get(type_url, NAMES[:4] if type_url in
                           (resource.ENDPOINT, resource.ROUTE) else [])
    if type_url == resource.ROUTE:
        names = ["egress"]
    elif step["names"] == "fewer":
        names = names[:2]
    elif step["names"] == "more":
        names = NAMES
    elif step["names"] == "reversed":
        names = list(reversed(names))
    elif step["names"] == "none":
        names = []
    request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
    if state is not None:
        request.response_nonce = {"last": state.nonce, "old": "0", "none": ""}[step["nonce"]]
        request.version_info = {"sent": state.sent_version, "other": "v-other",
                                "empty": ""}[step["version"]]
    if step["extra"] == "node" or stream.node is None:
        request.node.CopyFrom(node("p1"))
    elif step["extra"] == "error":
        request.error_detail.message = "rejected"
    elif step["extra"] == "locator":
        request.resource_locators.add(name="c0")
    last_names[type_url] = names
    return request


def _outcome(handled: Handled | Exception) -> Any:
    if isinstance(handled, Exception):
        return str(handled)
    return (handled.kind, handled.type_url, handled.error,
            [(p.type_url, p.nonce, p.version, p.encode()) for p in handled.pushes])


def _state(stream: SotwStream) -> dict[str, Any]:
    """What /debug/proxies shows, less the times (the two streams are made apart)."""
    shown = stream.describe()
    del shown["connected_at"]
    for typed in shown["types"].values():
        if typed["last_nack"] is not None:
            del typed["last_nack"]["at"]
    return shown


def _handle(stream: SotwStream, request: Any) -> Handled | Exception:
    try:
        return stream.on_request(request)
    except ProtocolError as exc:
        return exc


@settings(max_examples=150, deadline=None)
@given(steps)
def test_bytes_and_parsed_requests_are_handled_alike(plan: list[dict[str, Any]]) -> None:
    fast, slow = SotwStream(1, "ads"), SotwStream(1, "ads")
    port = 9000
    current = snapshot({n: (port,) for n in NAMES[:5]})
    for stream in (fast, slow):
        stream.on_snapshot(current)
    last_names: dict[str, list[str]] = {}
    for step in plan:
        request = _request(slow, step, last_names)
        data = request.SerializeToString()
        assert _outcome(_handle(fast, data)) == _outcome(
            _handle(slow, discovery_pb2.DiscoveryRequest.FromString(data)))
        assert _state(fast) == _state(slow)
        if step["snapshot"]:
            port += 1
            current = snapshot({n: (port,) for n in NAMES[:5]}, reuse=current)
            assert [_outcome(Handled("push", "", pushes=[p])) for p in
                    fast.on_snapshot(current)] == [
                _outcome(Handled("push", "", pushes=[p])) for p in slow.on_snapshot(current)]


def test_an_ack_of_the_last_push_with_the_same_names_is_not_parsed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    original = requests.read_request

    def counted(data: bytes) -> Any:
        parsed.append(data)
        return original(data)

    monkeypatch.setattr(sotw, "read_request", counted)  # sotw's own name for it
    stream = SotwStream(1, "ads")
    first = stream.on_snapshot(snapshot({n: (9000,) for n in NAMES}))
    assert first == []
    request = discovery_pb2.DiscoveryRequest(node=node("p1"), type_url=resource.ENDPOINT,
                                             resource_names=NAMES)
    [push] = stream.on_request(request.SerializeToString()).pushes
    assert len(parsed) == 1
    ack = discovery_pb2.DiscoveryRequest(type_url=resource.ENDPOINT, resource_names=NAMES,
                                         version_info=push.version, response_nonce=push.nonce)
    handled = stream.on_request(ack.SerializeToString())
    assert (handled.kind, handled.pushes, len(parsed)) == ("ack", [], 1)
    assert stream.types[resource.ENDPOINT].acked_version == push.version

    # One name fewer, or a NACK: each is parsed.
    for changed in (
        discovery_pb2.DiscoveryRequest(type_url=resource.ENDPOINT, resource_names=NAMES[:-1],
                                       version_info=push.version, response_nonce=push.nonce),
        discovery_pb2.DiscoveryRequest(type_url=resource.ENDPOINT, resource_names=NAMES,
                                       version_info=push.version, response_nonce=push.nonce,
                                       error_detail={"message": "no"}),
    ):
        before = len(parsed)
        stream.on_request(changed.SerializeToString())
        assert len(parsed) == before + 1


def test_bytes_that_do_not_parse_end_the_stream_with_a_clear_error() -> None:
    stream = SotwStream(1, "ads")
    with pytest.raises(ProtocolError, match=r"not a valid DiscoveryRequest .*; send "
                       r"envoy\.service\.discovery\.v3 messages"):
        stream.on_request(b"\x0a\xff\xff")
