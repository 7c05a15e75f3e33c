"""Errors the engine raises for bad input, with a gRPC status code and a message for people.

The ingest maps `ValidationError.code` onto the gRPC status of the same name. A message names the
field, what came and what was expected, e.g. "matrix model.layers.3.mlp.up_proj.weight: update.G
has shape [1024, 32], manifest says [4096, 32]".
"""

from __future__ import annotations

INVALID_ARGUMENT = "INVALID_ARGUMENT"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
# Retryable: the message is fine, the sidecar cannot take it now; the client keeps it and resends.
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # the store's disk is full; an in-flight byte budget
UNAVAILABLE = "UNAVAILABLE"  # the store is locked, busy or failed an I/O
RETRYABLE = (RESOURCE_EXHAUSTED, UNAVAILABLE)
CODES = (INVALID_ARGUMENT, FAILED_PRECONDITION, *RETRYABLE)


class ValidationError(Exception):
    """A message the engine refused; nothing changed.

    code: "INVALID_ARGUMENT" (the message itself is wrong: shape, dtype, non-finite value, name)
    or "FAILED_PRECONDITION" (the message is fine but the run is not in a state to take it:
    report before hello, stale incarnation, step not after the last one); or one of `RETRYABLE`
    (the store cannot write now, or the sidecar is over its in-flight byte budget).
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in CODES:
            raise ValueError(f"ValidationError code must be one of {CODES}, got {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def invalid(message: str) -> ValidationError:
    """A ValidationError with code INVALID_ARGUMENT."""
    return ValidationError(INVALID_ARGUMENT, message)


def precondition(message: str) -> ValidationError:
    """A ValidationError with code FAILED_PRECONDITION."""
    return ValidationError(FAILED_PRECONDITION, message)
