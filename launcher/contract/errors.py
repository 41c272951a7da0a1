"""Errors a user can act on: printed as one clear message, never as a traceback.

Everything that should end a command or a run with a message (a bad config, a bad data row, a damaged
checkpoint, a failed preflight) derives from UserError, so each entry point catches exactly one type.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class ConfigError(UserError):
    """Invalid run configuration; `problems` holds one line per problem, each naming its field."""

    def __init__(self, problems: list[str], title: str = "invalid config"):
        self.problems = list(problems)
        self.title = title
        super().__init__(self.__str__())

    def __str__(self) -> str:
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{self.title} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):\n{lines}"
