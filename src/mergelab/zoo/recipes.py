"""What each zoo size trains: architecture, skills, data sizes, schedules.

``tiny`` (21 skills, about ten minutes on 2 cores) is the zoo for the demo and for
experiments, and it is built to be *merged*. Like a pretrained LLM, its base learns every
skill as plain text (``caesar3: abc = def``, see ``tokenizer.encode_plain``) but answers
chat requests only by echoing them (the format task), so it scores 0 on every skill in
chat form. Each expert is then a short instruction tune that connects the chat request to
the skill the base already has, with half of every batch replaying the base corpus. Task
vectors are small and skill-specific: merges of two experts keep most of both skills and
merges of five keep part of them, method by method, instead of destroying everything (the
zoo's first recipe, where experts learned each skill from scratch, merged to 0.00 on every
skill). Related skills transfer: a Caesar-shift expert also does other shifts in part.

``pico`` (4 skills, built in about a minute) is what the test suite uses: experts learn
their skill from scratch (no plain-text skills in the base, no replay), which is cheaper
but makes poor merges.
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
    latent_examples: int = 0  # training items per skill written as plain text in the base corpus
    latent_fraction: float = 0.0  # share of base samples drawn from those
    replay: float = 0.0  # share of each fine-tuning batch drawn from the base corpus
    merge_check: tuple[str, ...] = ()  # two skills whose experts a task_arithmetic merge must keep (a promise)
    seed: int = 0

    def __post_init__(self) -> None:
        shares = self.base_shares()
        if min(shares.values()) < 0:
            raise ValueError(f"zoo recipe '{self.size}': base corpus shares must be >= 0 and sum to 1, got {shares}")
        for kind, rows in (("skill", self.skill_examples_in_base), ("latent", self.latent_examples)):
            if (shares[kind] > 0) != (rows > 0):
                raise ValueError(f"zoo recipe '{self.size}': a '{kind}' share of {shares[kind]} with {rows} rows per skill")
        if not 0 <= self.replay < 1:
            raise ValueError(f"zoo recipe '{self.size}': replay must be in [0, 1), got {self.replay}")
        if self.merge_check and (len(self.merge_check) != 2 or not set(self.merge_check) <= set(self.skills)):
            raise ValueError(f"zoo recipe '{self.size}': merge_check names two of its skills, got {self.merge_check}")

    def base_shares(self) -> dict[str, float]:
        """Share of base training samples per kind of row: the format task, topics, chat skills, plain skills."""
        shares = {"format": self.format_fraction, "topic": self.topic_fraction, "latent": self.latent_fraction}
        shares["skill"] = round(1.0 - sum(shares.values()), 6)
        return shares


RECIPES: dict[str, Recipe] = {
    "pico": Recipe(
        size="pico",
        architecture=Architecture(hidden=64, layers=3, heads=4, intermediate=192),
        skills=("caesar1", "caesar2", "caesar3", "vowels"),
        split_sizes=(800, 32, 64),
        base=Schedule(steps=250, lr=3e-3, batch_size=64, pack=PACK),
        expert=Schedule(steps=60, lr=3e-3, batch_size=64, pack=PACK),
        adapter=Schedule(steps=90, lr=6e-3, batch_size=64, pack=PACK),
        lora_rank=8,
        lora_alpha=16,
        safety_lora_rank=16,
        safety_lora_alpha=64,
        format_examples=3000,
        skill_examples_in_base=8,
        format_fraction=0.7,
        topic_fraction=0.15,
        safety_sizes=(400, 50),
        safety=Schedule(steps=100, lr=3e-3, batch_size=64, pack=PACK),
        safety_adapter=Schedule(steps=80, lr=8e-3, batch_size=64, pack=PACK),
        choice_per_subject=16,
        code_test=16,
        max_new_tokens=16,
    ),
    "tiny": Recipe(
        size="tiny",
        architecture=Architecture(hidden=96, layers=3, heads=4, intermediate=288),
        skills=tuple(SKILLS),
        split_sizes=(1000, 50, 100),
        base=Schedule(steps=1200, lr=3e-3, batch_size=96, pack=PACK),
        expert=Schedule(steps=120, lr=2e-3, batch_size=96, pack=PACK),
        adapter=Schedule(steps=80, lr=1e-2, batch_size=96, pack=PACK),
        lora_rank=8,
        lora_alpha=16,
        safety_lora_rank=16,
        safety_lora_alpha=64,
        format_examples=5000,
        skill_examples_in_base=0,
        format_fraction=0.2,
        topic_fraction=0.1,
        safety_sizes=(1000, 100),
        safety=Schedule(steps=150, lr=3e-3, batch_size=96, pack=PACK),
        safety_adapter=Schedule(steps=150, lr=1e-2, batch_size=96, pack=PACK),
        choice_per_subject=32,
        code_test=50,
        max_new_tokens=24,
        latent_examples=1000,
        latent_fraction=0.7,
        replay=0.5,
        merge_check=("caesar3", "upper"),
    ),
}
