"""The choice task with two subjects: per-subject breakdowns, and k-shot examples from the same subject's dev rows.

lm-eval's MMLU is one task per subject, each with its own "about {subject}" description
and its few-shot examples the first k dev rows of that subject (``first_n`` sampler).
"""

from __future__ import annotations

import pytest

from mergelab.evaluate.results import summarize_mean
from mergelab.evaluate.runner import RunnerStats
from mergelab.evaluate.tasks import Context, make_task


class AlwaysFirstOption:
    """A runner whose model always prefers option A (" A" scores 0, any other continuation −1); records contexts."""

    device = "cpu"

    def __init__(self):
        self.stats = RunnerStats()
        self.contexts: list[str] = []

    def loglikelihood(self, requests):
        self.contexts += [context for context, _ in requests]
        return [(0.0 if continuation == " A" else -1.0, False) for _, continuation in requests]


def question(text: str, answer: int, subject: str) -> dict:
    return {"question": text, "choices": ["w", "x", "y", "z"], "answer": answer, "subject": subject}


TEST_ROWS = [  # interleaved subjects; option A (0) is right for 2 of 3 anatomy questions and no astronomy one
    question("anatomy one?", 0, "anatomy"),
    question("astronomy one?", 1, "astronomy"),
    question("anatomy two?", 0, "anatomy"),
    question("astronomy two?", 3, "astronomy"),
    question("anatomy three?", 2, "anatomy"),
]
DEV_ROWS = [  # astronomy first, so a sampler ignoring subjects would take astronomy shots for anatomy
    question("dev astronomy a?", 1, "astronomy"),
    question("dev astronomy b?", 2, "astronomy"),
    question("dev anatomy a?", 0, "anatomy"),
    question("dev astronomy c?", 3, "astronomy"),
    question("dev anatomy b?", 3, "anatomy"),
    question("dev anatomy c?", 1, "anatomy"),
]


@pytest.fixture
def two_subjects(tmp_path, jsonl):
    return jsonl(tmp_path / "test.jsonl", TEST_ROWS), jsonl(tmp_path / "dev.jsonl", DEV_ROWS)


def run_choice(test, dev, shots: int, seed: int = 3):
    task = make_task(f"choice:data={test},dev={dev}")
    task.load(num_fewshot=shots)
    runner = AlwaysFirstOption()
    return task.run(Context(runner=runner, seed=seed)), runner


def test_each_subject_has_its_own_n_and_metrics(two_subjects):
    result, _ = run_choice(*two_subjects, shots=0)
    anatomy, astronomy = [1.0, 1.0, 0.0], [0.0, 0.0]
    assert set(result.breakdown["subject"]) == {"anatomy", "astronomy"}
    for name in ("acc", "acc_norm"):  # letters all have length 1, so acc_norm picks what acc picks
        assert result.breakdown["subject"]["anatomy"][name] == summarize_mean(anatomy, 3)
        assert result.breakdown["subject"]["astronomy"][name] == summarize_mean(astronomy, 3)
        assert result.metrics[name] == summarize_mean([1.0, 0.0, 1.0, 0.0, 0.0], 3)  # items in file order
    assert result.breakdown["subject"]["anatomy"]["acc"]["n"] == 3
    assert result.breakdown["subject"]["anatomy"]["acc"]["value"] == pytest.approx(2 / 3)
    assert result.breakdown["subject"]["astronomy"]["acc"]["n"] == 2
    assert result.breakdown["subject"]["astronomy"]["acc"]["value"] == 0.0
    assert [item["subject"] for item in result.items] == [row["subject"] for row in TEST_ROWS]


def shot(row: dict) -> str:
    letters = "ABCD"
    options = "".join(f"\n{letters[i]}. {choice}" for i, choice in enumerate(row["choices"]))
    return f"{row['question']}{options}\nAnswer: {letters[row['answer']]}\n\n"


def test_k_shot_examples_are_the_first_dev_rows_of_the_same_subject(two_subjects):
    _, runner = run_choice(*two_subjects, shots=2)
    contexts = list(dict.fromkeys(runner.contexts))  # one context per question, four continuations each
    assert len(contexts) == len(TEST_ROWS)
    anatomy_shots = shot(DEV_ROWS[2]) + shot(DEV_ROWS[4])
    astronomy_shots = shot(DEV_ROWS[0]) + shot(DEV_ROWS[1])
    for row, context in zip(TEST_ROWS, contexts):
        subject = row["subject"]
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        expected_shots = anatomy_shots if subject == "anatomy" else astronomy_shots
        question_text = f"{row['question']}\nA. w\nB. x\nC. y\nD. z\nAnswer:"
        assert context == header + expected_shots + question_text, row["question"]
        other = "astronomy" if subject == "anatomy" else "anatomy"
        assert f"dev {other}" not in context


def test_too_few_dev_rows_for_a_subject_is_an_error_naming_it(two_subjects):
    from mergelab.errors import InputError

    with pytest.raises(InputError, match=r"dev\.jsonl: 4-shot needs 4 dev examples for subject 'anatomy', found 3"):
        run_choice(*two_subjects, shots=4)


def test_a_space_after_a_comma_in_a_task_spec_is_pointed_out():
    from mergelab.errors import ConfigError
    from mergelab.evaluate import make_task

    with pytest.raises(ConfigError, match="takes one value, got x.jsonl, chat=true \\(a space after a comma\\?"):
        make_task("generate:data=x.jsonl, chat=true")


def test_the_question_itself_is_never_its_own_example(two_subjects):
    """With dev the evaluated file, each question's shots skip it and take the next rows (as lm-eval)."""
    test, _ = two_subjects
    _, runner = run_choice(test, test, shots=1)
    contexts = list(dict.fromkeys(runner.contexts))
    anatomy = [row for row in TEST_ROWS if row["subject"] == "anatomy"]
    assert shot(anatomy[1]) in contexts[0] and shot(anatomy[0]) not in contexts[0]  # "anatomy one?" takes "two"
    assert shot(anatomy[0]) in contexts[2]  # "anatomy two?" takes "one"
    for row, context in zip(TEST_ROWS, contexts):
        assert context.count(row["question"]) == 1, row["question"]
