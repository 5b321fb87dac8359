"""A Task = prompts with references + a verifier (reward in [0, 1]) + the answer-extraction rule."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import verifiers


@dataclass
class Example:
    prompt: str
    reference: str  # final answer (math: a number; mc: a letter; open: the reference text)
    family: str  # "math", "mc" or "open"
    solutions: dict[str, str] = field(default_factory=dict)  # style -> a correct response text
    source: str = ""  # where it came from ("file:line"), for error messages

    @property
    def solution(self) -> str | None:
        """The first reference solution (the data set's own worked answer where it has one)."""
        return next(iter(self.solutions.values()), None)


@dataclass
class Task:
    name: str
    train: list[Example]
    eval: list[Example]
    strict: bool = False  # strict: only an explicit final-answer marker counts

    def score(self, example: Example, response: str) -> float:
        return verifiers.score(example.family, response, example.reference, strict=self.strict)

    def extract(self, example: Example, response: str) -> str | None:
        return verifiers.extract(example.family, response, strict=self.strict)

    def well_formed(self, example: Example, response: str) -> bool:
        """The response ends in an answer the task can parse (its explicit marker for strict tasks)."""
        if example.family == "open":
            return bool(response.strip())
        return verifiers.extract(example.family, response, strict=True) is not None

    @property
    def families(self) -> list[str]:
        return sorted({e.family for e in self.train + self.eval})
