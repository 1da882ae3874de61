"""The one error of the pure protocols: a parameter out of range, naming the field."""

from __future__ import annotations


class ProtocolParamError(ValueError):
    """A protocol parameter is invalid; ``field`` names it (the engine answers INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
