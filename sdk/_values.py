"""JSON-able Python values to and from ``google.protobuf.Value``.

Step inputs and outputs travel as ``google.protobuf.Value``; agents deal in
plain Python. Apart from :mod:`mabeam.agent` (which re-exports both) so that
the servicer can convert a step's output without importing the public module.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2


def to_value(data: Any) -> struct_pb2.Value:
    """A JSON-able Python value as a ``google.protobuf.Value``."""
    if isinstance(data, struct_pb2.Value):
        return data
    value = struct_pb2.Value()
    json_format.ParseDict(data, value)
    return value


def from_value(value: struct_pb2.Value) -> Any:
    """A ``google.protobuf.Value`` as plain Python (dict, list, str, float, bool, None)."""
    return json_format.MessageToDict(value)
