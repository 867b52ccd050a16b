"""What each zoo size trains: architecture, skills, data sizes, schedules.

``pico`` (4 skills, builds in about a minute) is what the test suite uses; ``tiny``
(21 skills, about ten minutes on 2 cores) is the default for the demo and experiments.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergelab.zoo.skills import SKILLS
from mergelab.zoo.train import Architecture, Schedule


PACK = 128  # tokens per packed training row (see train.packed_tensors)


@dataclass(frozen=True)
class Recipe:
    size: str
    architecture: Architecture
    skills: tuple[str, ...]
    split_sizes: tuple[int, int, int]  # train, validation, test items per skill
    base: Schedule  # pretraining
    expert: Schedule  # full fine-tune per skill
    adapter: Schedule  # LoRA per skill
    lora_rank: int
    lora_alpha: int
    safety_lora_rank: int  # refusing needs a larger update than the copy-like skills
    safety_lora_alpha: int
    format_examples: int  # copy-task examples teaching the instruction format
    skill_examples_in_base: int  # "a little of every skill": training items per skill in the base corpus
    format_fraction: float  # share of base samples drawn from the format task
    topic_fraction: float  # share of base samples naming a request's topic (harm / help), see safety.topic_rows
    safety_sizes: tuple[int, int]  # train, test records per class (harmful / benign)
    safety: Schedule
    safety_adapter: Schedule
    choice_per_subject: int
    code_test: int
    max_new_tokens: int
    seed: int = 0


RECIPES: dict[str, Recipe] = {
    "pico": Recipe(
        size="pico",
        architecture=Architecture(hidden=64, layers=3, heads=4, intermediate=192),
        skills=("caesar1", "caesar2", "caesar3", "reverse"),
        split_sizes=(800, 32, 64),
        base=Schedule(steps=350, lr=3e-3, batch_size=64, pack=PACK),
        expert=Schedule(steps=70, lr=3e-3, batch_size=64, pack=PACK),
        adapter=Schedule(steps=70, lr=6e-3, batch_size=64, pack=PACK),
        lora_rank=8,
        lora_alpha=16,
        safety_lora_rank=16,
        safety_lora_alpha=64,
        format_examples=3000,
        skill_examples_in_base=8,
        format_fraction=0.7,
        topic_fraction=0.15,
        safety_sizes=(400, 50),
        safety=Schedule(steps=120, lr=3e-3, batch_size=64, pack=PACK),
        safety_adapter=Schedule(steps=150, lr=5e-3, batch_size=64, pack=PACK),
        choice_per_subject=16,
        code_test=16,
        max_new_tokens=16,
    ),
    "tiny": Recipe(
        size="tiny",
        architecture=Architecture(hidden=96, layers=3, heads=4, intermediate=288),
        skills=tuple(SKILLS),
        split_sizes=(1000, 50, 100),
        base=Schedule(steps=300, lr=3e-3, batch_size=96, pack=PACK),
        expert=Schedule(steps=100, lr=3e-3, batch_size=96, pack=PACK),
        adapter=Schedule(steps=100, lr=1e-2, batch_size=96, pack=PACK),
        lora_rank=8,
        lora_alpha=16,
        safety_lora_rank=16,
        safety_lora_alpha=64,
        format_examples=5000,
        skill_examples_in_base=8,
        format_fraction=0.7,
        topic_fraction=0.15,
        safety_sizes=(1000, 100),
        safety=Schedule(steps=150, lr=3e-3, batch_size=96, pack=PACK),
        safety_adapter=Schedule(steps=150, lr=1e-2, batch_size=96, pack=PACK),
        choice_per_subject=32,
        code_test=50,
        max_new_tokens=24,
    ),
}
