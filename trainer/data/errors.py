"""The one exception every stage of row preprocessing raises for a row it cannot train on."""
from __future__ import annotations


class BadRow(Exception):
    """A row that cannot be trained on; `reason` is a short stable key, the message says more."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")
