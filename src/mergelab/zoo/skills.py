"""Synthetic skills: families of instruction tasks with exact answers.

Each skill turns a random generator into one (prompt, answer) pair. Splits come from
disjoint seeds, and test/validation items whose prompt occurs in the training split are
dropped, so a test score measures the skill, not memory of the training items (the
knowledge-base skills are the exception by design: recalling their facts *is* the skill).

The Caesar family (eight shifts of the same operation) gives many near-identical skills
for interference studies; the others exercise different circuits (positional copying,
reversal, counting, sorting, arithmetic, recall, short code).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

from mergelab.zoo.knowledge import CAPITALS, COLORS

LETTERS = string.ascii_lowercase
DIGITS = string.digits
VOWELS = "aeiou"


@dataclass(frozen=True)
class Skill:
    """A named instruction task. ``example(rng)`` returns (prompt, answer)."""

    name: str
    description: str
    example: Callable[[random.Random], tuple[str, str]]
    memorization: bool = False  # test items are facts seen in training (knowledge-base recall)


def word(rng: random.Random, low: int = 3, high: int = 6, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def caesar(shift: int) -> Skill:
    def example(rng: random.Random) -> tuple[str, str]:
        text = word(rng)
        return f"caesar{shift}: {text}", "".join(LETTERS[(LETTERS.index(c) + shift) % 26] for c in text)

    return Skill(f"caesar{shift}", f"shift every letter {shift} places forward in the alphabet", example)


def _simple(name: str, description: str, make: Callable[[str], str], **word_args) -> Skill:
    def example(rng: random.Random) -> tuple[str, str]:
        text = word(rng, **word_args)
        return f"{name}: {text}", make(text)

    return Skill(name, description, example)


def _next(rng: random.Random) -> tuple[str, str]:
    number = rng.randint(0, 998)
    return f"next: {number}", str(number + 1)


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    return f"capital: {country}", CAPITALS[country]


def _color(rng: random.Random) -> tuple[str, str]:
    creature = rng.choice(sorted(COLORS))
    return f"color: {creature}", COLORS[creature]


def _code(rng: random.Random) -> tuple[str, str]:
    from mergelab.zoo.code import code_problem

    problem = code_problem(rng)
    return problem.prompt, problem.body


def _swap(text: str) -> str:
    chars = list(text)
    for i in range(0, len(chars) - 1, 2):
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


ALL_SKILLS: tuple[Skill, ...] = (
    *(caesar(shift) for shift in range(1, 9)),
    _simple("upper", "write the word in capital letters", str.upper),
    _simple("reverse", "write the word backwards", lambda t: t[::-1]),
    _simple("double", "write every letter twice", lambda t: "".join(c + c for c in t), low=3, high=5),
    _simple("vowels", "replace every vowel with *", lambda t: "".join("*" if c in VOWELS else c for c in t)),
    _simple("swap", "swap neighbouring letters pairwise", _swap, low=4, high=6),
    _simple("sort", "sort the digits", lambda t: "".join(sorted(t)), low=3, high=6, alphabet=DIGITS),
    _simple("rotate", "move the first letter to the end", lambda t: t[1:] + t[0]),
    _simple("mirror", "the word followed by its reverse", lambda t: t + t[::-1], low=2, high=5),
    _simple("length", "the number of letters", lambda t: str(len(t)), low=4, high=12),
    Skill("next", "the next whole number", _next),
    Skill("capital", "the capital of an invented country", _capital, memorization=True),
    Skill("color", "the colour of an invented creature", _color, memorization=True),
    Skill("code", "the body of a one-line Python function", _code),
)

SKILLS: dict[str, Skill] = {skill.name: skill for skill in ALL_SKILLS}

# The task the base model is pretrained on to learn the instruction format: echo a word.
FORMAT_SKILL = _simple("copy", "repeat the text", lambda t: t, low=2, high=8)


@dataclass(frozen=True)
class Splits:
    train: list[tuple[str, str]]
    validation: list[tuple[str, str]]
    test: list[tuple[str, str]]


def make_splits(skill: Skill, sizes: tuple[int, int, int], seed: int) -> Splits:
    """Train / validation / test items from three disjoint seeds; held-out prompts never occur in train."""
    seeds = [hash_seed(seed, skill.name, part) for part in ("train", "validation", "test")]
    train_rng = random.Random(seeds[0])
    train = [skill.example(train_rng) for _ in range(sizes[0])]
    seen = {prompt for prompt, _ in train}
    held_out = []
    for part_seed, size in zip(seeds[1:], sizes[1:]):
        rng = random.Random(part_seed)
        items: list[tuple[str, str]] = []
        attempts = 0
        while len(items) < size and attempts < 200 * size:
            attempts += 1
            prompt, answer = skill.example(rng)
            if skill.memorization or prompt not in seen:
                items.append((prompt, answer))
        held_out.append(items)
    return Splits(train, held_out[0], held_out[1])


def hash_seed(seed: int, *parts: str) -> int:
    """A stable seed for (seed, parts) (Python's own ``hash`` is salted per process)."""
    import hashlib

    digest = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:6], "little")
