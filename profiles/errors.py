"""The base of loraflow's typed errors, and the profile's own.

They live here, in the lowest layer, so that `profiles` imports nothing from `tasks`;
`tasks.errors` re-exports both and defines the rest of the hierarchy.
"""
from __future__ import annotations


class LoraflowError(Exception):
    """Base class. `transient` tells the retry policy whether trying again can help."""

    transient = False

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, "message": self.message}


class ProfileError(LoraflowError):
    """The profile is invalid: names the field, the cause and the fix."""
