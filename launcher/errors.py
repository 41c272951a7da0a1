"""Errors the launcher reports to the user: every problem at once, no traceback."""
from __future__ import annotations


class ConfigError(Exception):
    """Invalid run configuration; `problems` holds one line per problem, each naming its field."""

    def __init__(self, problems: list[str], title: str = "invalid config"):
        self.problems = list(problems)
        self.title = title
        super().__init__(self.__str__())

    def __str__(self) -> str:
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{self.title} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):\n{lines}"
