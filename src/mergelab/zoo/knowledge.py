"""An invented world: countries with capitals, creatures with colours.

The facts are made up (no model has seen them anywhere), fixed by a seed, so recalling
them is a skill only a model trained on them can have. The multiple-choice set asks
about the same facts in MMLU format (question, four choices, answer letter).
"""

from __future__ import annotations

import random

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "kl", "sh")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r", "s", "x", "l")
COLOR_WORDS = ("red", "blue", "green", "gold", "grey", "pink", "black", "white")


def _names(rng: random.Random, count: int, syllables: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _world(seed: int = 7, countries: int = 32, creatures: int = 32) -> tuple[dict[str, str], dict[str, str]]:
    rng = random.Random(seed)
    taken: set[str] = set()
    country_names = _names(rng, countries, 2, taken)
    capital_names = _names(rng, countries, 2, taken)
    creature_names = _names(rng, creatures, 2, taken)
    capitals = dict(zip(country_names, capital_names))
    colors = {name: rng.choice(COLOR_WORDS) for name in creature_names}
    return capitals, colors


CAPITALS, COLORS = _world()


def multiple_choice(seed: int, per_subject: int) -> list[dict]:
    """MMLU-format rows (question, choices, answer letter, subject) about the invented facts."""
    rng = random.Random(seed)
    rows = []
    subjects = (
        ("geography", CAPITALS, "What is the capital of {}?"),
        ("zoology", COLORS, "What colour is the {}?"),
    )
    for subject, facts, question in subjects:
        keys = sorted(facts)
        rng.shuffle(keys)
        for key in keys[:per_subject]:
            wrong = sorted({value for value in facts.values() if value != facts[key]})
            choices = rng.sample(wrong, 3) + [facts[key]]
            rng.shuffle(choices)
            rows.append({
                "question": question.format(key),
                "choices": choices,
                "answer": "ABCD"[choices.index(facts[key])],
                "subject": subject,
            })
    return rows
