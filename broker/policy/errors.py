"""The one error a policy load raises, so counsel sees which file and line to fix."""

from __future__ import annotations

from pathlib import Path


class PolicyError(Exception):
    """A policy file is missing or invalid; the broker refuses to start on it."""

    def __init__(self, file: str | Path, line: int | None, message: str) -> None:
        self.file = str(file)
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"

    def __reduce__(self):  # keeps the error picklable across process boundaries
        return (type(self), (self.file, self.line, self.message))
