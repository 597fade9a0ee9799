"""Small protobuf helpers shared by the translator modules."""

from __future__ import annotations

from datetime import timedelta

from envoy.config.core.v3 import address_pb2, config_source_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

_MICROS = 1_000_000


def duration(value: timedelta) -> duration_pb2.Duration:
    """Exact conversion in integers: going through float seconds would turn 100ms into
    0.099999999s in some cases and change the resource version for nothing."""
    micros = (value.days * 86_400 + value.seconds) * _MICROS + value.microseconds
    seconds, rest = divmod(micros, _MICROS)
    return duration_pb2.Duration(seconds=seconds, nanos=rest * 1000)


def pack(message: Message) -> any_pb2.Any:
    """Deterministic packing, so that equal inputs give byte-identical resources even
    when the packed message holds maps."""
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def u32(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=value)


def ads() -> config_source_pb2.ConfigSource:
    """Every dynamic resource comes over the one ADS stream the bootstrap opens."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def socket_address(address: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=address, port_value=port)
    )


def struct(values: dict[str, str]) -> struct_pb2.Struct:
    """Keys inserted in sorted order, so the Struct reads the same whichever way the
    source ordered its labels."""
    result = struct_pb2.Struct()
    for key in sorted(values):
        result.fields[key].string_value = values[key]
    return result
