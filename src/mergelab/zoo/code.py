"""Tiny Python problems in HumanEval format, small enough for the zoo's models.

Each problem asks for the one-line body of ``f(x)`` described by its docstring
("x plus 3"), with a ``check(candidate)`` test, exactly like HumanEval rows
(task_id, prompt, entry_point, canonical_solution, test), so the same sandboxed pass@k
evaluation serves the zoo and the real benchmark.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OPERATIONS = (
    ("plus", "+", lambda a, b: a + b),
    ("minus", "-", lambda a, b: a - b),
    ("times", "*", lambda a, b: a * b),
)
VARIABLES = ("x", "n", "a", "v", "y", "k")


@dataclass(frozen=True)
class CodeProblem:
    prompt: str
    body: str
    test: str

    def row(self, task_id: str) -> dict:
        return {
            "task_id": task_id,
            "prompt": self.prompt,
            "entry_point": "f",
            "canonical_solution": self.body,
            "test": self.test,
        }


def code_problem(rng: random.Random) -> CodeProblem:
    """``f(v) = v op k`` described in words, e.g. ``n times 37``."""
    variable = rng.choice(VARIABLES)
    (word, symbol, _), k = rng.choice(OPERATIONS), rng.randint(2, 99)
    expression = f"{variable} {symbol} {k}"
    prompt = f'def f({variable}):\n    """{variable} {word} {k}"""\n'
    body = f"    return {expression}\n"
    checks = "".join(f"    assert candidate({x}) == {eval(expression, {}, {variable: x})}\n"  # noqa: S307
                     for x in (0, 3, 11, 25))
    return CodeProblem(prompt, body, f"def check(candidate):\n{checks}")
