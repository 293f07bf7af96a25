"""User-facing errors: each problem names where, what was expected or found, and a hint."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    where: str  # e.g. "recipes/demo.yaml: defaults.width" or "command line: precision"
    what: str
    hint: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}\n  hint: {self.hint}"


class UserError(Exception):
    """One or more problems the user can fix; printed without a traceback, exit status 2."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]):
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def one(cls, where: str, what: str, hint: str) -> UserError:
        return cls([Problem(where, what, hint)])
