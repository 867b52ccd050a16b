"""Results JSON, the result cache (warm reruns, resuming after an interruption), fingerprints, comparisons."""

from __future__ import annotations

import json
import shutil

import pytest

from mergelab.errors import ConfigError
from mergelab.evaluate import (
    ResultCache,
    compare_results,
    evaluate,
    evaluate_directory,
    fingerprint_directory,
    fingerprint_module,
    format_comparison,
    read_results,
    write_results,
)
from mergelab.evaluate.results import summarize_mean, summarize_ratio
from mergelab.zoo.random_models import make_variant


@pytest.fixture(scope="module")
def choice_spec(mmlu_files):
    return f"choice:data={mmlu_files['test']}"


def test_results_json_has_metrics_intervals_items_and_provenance(tiny_dir, tiny, choice_spec, mmlu_files, tmp_path):
    import platform
    from importlib import metadata

    import torch

    results = evaluate_directory(str(tiny_dir), [choice_spec], cache=tmp_path / "cache", seed=3, batch_size=5)
    path = write_results(results, tmp_path / "results.json")
    saved = read_results(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "results.json"]  # no temporary left behind
    assert saved["model"]["fingerprint"] == fingerprint_directory(tiny_dir, content=False)
    assert saved["model"]["content_fingerprint"] == fingerprint_directory(tiny_dir)  # a cache was used: weights hashed
    assert saved["model"]["adapters"] == []
    assert saved["versions"]["python"] == platform.python_version()
    for package in ("torch", "transformers", "mergelab"):
        assert saved["versions"][package] == metadata.version(package)
    assert saved["settings"]["seed"] == 3 and saved["settings"]["batch_size"] == 5
    assert saved["wall_seconds"] > 0 and saved["items_per_second"] > 0
    task = saved["tasks"][choice_spec]
    assert task["items_per_second"] == pytest.approx(24 / task["wall_seconds"])
    # Every item against an independent reference: one plain transformers forward pass per option.
    model, tokenizer = tiny
    rows = [json.loads(line) for line in mmlu_files["test"].read_text().splitlines()]
    assert len(task["items"]) == len(rows) == 24
    for item, row in zip(task["items"], rows):
        context = (f"The following are multiple choice questions (with answers) about {row['subject']}.\n\n"
                   + row["question"].strip() + "".join(f"\n{l}. {c}" for l, c in zip("ABCD", row["choices"]))
                   + "\nAnswer:")
        context_ids = tokenizer.encode(context)
        expected = []
        for letter in "ABCD":
            ids = tokenizer.encode(context + " " + letter)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            expected.append(float(sum(logprobs[i - 1, ids[i]] for i in range(len(context_ids), len(ids)))))
        assert item["output"]["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
        assert item["target"] == row["answer"]
        assert item["scores"]["acc"] == float(max(range(4), key=lambda i: expected[i]) == row["answer"])
    accs = [item["scores"]["acc"] for item in task["items"]]
    acc = task["metrics"]["acc"]
    assert acc["value"] == pytest.approx(sum(accs) / 24) and acc["n"] == 24
    mean = sum(accs) / 24
    assert acc["stderr"] == pytest.approx((sum((a - mean) ** 2 for a in accs) / 23) ** 0.5 / 24 ** 0.5)
    assert acc["ci95"][0] <= acc["value"] <= acc["ci95"][1]
    assert task["breakdown"]["subject"] == {"anatomy": task["metrics"]}  # one subject: its rows are all rows


def test_warm_rerun_is_served_from_the_cache_without_loading_the_model(tiny_dir, choice_spec, tmp_path):
    cold = evaluate_directory(str(tiny_dir), [choice_spec], cache=tmp_path / "cache")
    warm = evaluate_directory(str(tiny_dir), [choice_spec], cache=tmp_path / "cache")
    assert cold["model"]["loaded"] is True and warm["model"]["loaded"] is False
    assert warm["tasks"][choice_spec]["answers"] == {"cached": 96, "computed": 0}
    assert warm["tasks"][choice_spec]["metrics"] == cold["tasks"][choice_spec]["metrics"]
    assert warm["tasks"][choice_spec]["items"] == cold["tasks"][choice_spec]["items"]


def test_an_interrupted_run_keeps_scored_items_and_resumes(tiny_dir, choice_spec, tmp_path):
    batches = {"count": 0}

    def interrupt_after_two_batches(runner):
        def check():
            batches["count"] += 1
            if batches["count"] == 2:
                raise KeyboardInterrupt

        runner.interrupt_check = check

    with pytest.raises(KeyboardInterrupt):
        evaluate_directory(str(tiny_dir), [choice_spec], cache=tmp_path / "cache", batch_size=4,
                           runner_hook=interrupt_after_two_batches)
    resumed = evaluate_directory(str(tiny_dir), [choice_spec], cache=tmp_path / "cache", batch_size=4)
    assert resumed["tasks"][choice_spec]["answers"] == {"cached": 2 * 4 * 4, "computed": 96 - 32}
    clean = evaluate_directory(str(tiny_dir), [choice_spec], cache=False, batch_size=4)
    for name in ("acc", "acc_norm"):
        assert resumed["tasks"][choice_spec]["metrics"][name]["value"] == clean["tasks"][choice_spec]["metrics"][name]["value"]


def test_fingerprints_follow_content(tiny_dir, tmp_path):
    cache = ResultCache(tmp_path / "cache")
    original = fingerprint_directory(tiny_dir, cache=cache)
    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    assert fingerprint_directory(copy) == original
    variant = make_variant(tiny_dir, tmp_path / "variant", seed=5, scale=0.01)
    assert fingerprint_directory(variant) != original
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    assert fingerprint_directory(copy) != original


def test_the_generation_config_is_part_of_both_fingerprints(tiny_dir, tmp_path):
    """Generation stops at generation_config.json's EOS ids, so a different one must not reuse cached answers."""
    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    before = fingerprint_directory(copy), fingerprint_directory(copy, content=False)
    config = json.loads((copy / "generation_config.json").read_text())
    config["eos_token_id"] = [2, 7]
    (copy / "generation_config.json").write_text(json.dumps(config))
    after = fingerprint_directory(copy), fingerprint_directory(copy, content=False)
    assert before[0] != after[0] and before[1] != after[1]


def test_without_a_cache_no_weight_byte_is_hashed(tiny_dir, choice_spec, monkeypatch, tmp_path):
    from mergelab.evaluate import model as model_module

    def refuse(path, cache):
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(model_module, "_file_digest", refuse)
    results = evaluate_directory(str(tiny_dir), [choice_spec], cache=False, limit=3)
    assert results["model"]["fingerprint"] == fingerprint_directory(tiny_dir, content=False)
    assert results["model"]["content_fingerprint"] is None
    with pytest.raises(AssertionError, match="hashed"):  # a cache needs the content fingerprint
        evaluate_directory(str(tiny_dir), [choice_spec], cache=tmp_path / "cache", limit=3)


def test_evaluate_leaves_the_callers_random_state_alone(tiny, tmp_path, jsonl):
    import random

    import numpy as np
    import torch

    model, tokenizer = tiny
    data = jsonl(tmp_path / "qa.jsonl", [{"prompt": "hello", "answer": "x"}, {"prompt": "model", "answer": "y"}])
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    evaluate(model, tokenizer, [f"generate:data={data},max_new_tokens=3,temperature=0.7"], seed=5)
    assert random.getstate() == states[0]
    assert (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])


def test_results_do_not_depend_on_task_order_or_the_global_random_state(tiny, mmlu_files, tmp_path, jsonl):
    import torch

    model, tokenizer = tiny
    data = jsonl(tmp_path / "qa.jsonl", [{"prompt": p, "answer": "x"} for p in ("hello", "model weight", "three")])
    specs = [f"generate:data={data},max_new_tokens=5,temperature=0.9,stop=none", f"choice:data={mmlu_files['test']}",
             f"generate:data={data},max_new_tokens=4,temperature=1.3,top_p=0.8,stop=none"]
    torch.manual_seed(1)
    forward = evaluate(model, tokenizer, specs, seed=7, limit=3)["tasks"]
    torch.manual_seed(2)
    torch.rand(1000)
    backward = evaluate(model, tokenizer, specs[::-1], seed=7, limit=3)["tasks"]
    alone = evaluate(model, tokenizer, specs[2:], seed=7, limit=3)["tasks"]
    for spec in specs:
        assert forward[spec]["items"] == backward[spec]["items"], spec
        assert forward[spec]["metrics"] == backward[spec]["metrics"], spec
    assert alone[specs[2]]["items"] == forward[specs[2]]["items"]
    outputs = [item["output"] for item in forward[specs[0]]["items"]]
    assert len(set(outputs)) > 1  # really sampled
    other_seed = evaluate(model, tokenizer, specs[:1], seed=8, limit=3)["tasks"][specs[0]]
    assert [item["output"] for item in other_seed["items"]] != outputs


def test_a_reused_task_keeps_its_limit_and_says_so(tiny, mmlu_files):
    from mergelab.evaluate import make_task

    model, tokenizer = tiny
    task = make_task(f"choice:data={mmlu_files['test']}")
    first = evaluate(model, tokenizer, [task], limit=5)
    again = evaluate(model, tokenizer, [task])  # no limit given: the task as loaded
    assert first["tasks"][task.spec]["n_items"] == again["tasks"][task.spec]["n_items"] == 5
    assert again["settings"]["limit"] == 5 and again["tasks"][task.spec]["loaded_with"]["limit"] == 5
    with pytest.raises(ConfigError, match="loaded with limit=5, but limit=10 was asked for"):
        evaluate(model, tokenizer, [task], limit=10)
    with pytest.raises(ConfigError, match="loaded with num_fewshot=None, but num_fewshot=2"):
        evaluate(model, tokenizer, [task], num_fewshot=2)


def test_in_memory_evaluation_with_a_cache_hashes_the_weights(tiny, choice_spec, tmp_path):
    import torch

    model, tokenizer = tiny
    first = evaluate(model, tokenizer, [choice_spec], cache=tmp_path / "cache")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            model.lm_head.weight.mul_(1.5)  # as an optimiser's in-place update would
        second = evaluate(model, tokenizer, [choice_spec], cache=tmp_path / "cache")
    finally:
        model.load_state_dict(state)
    assert first["model"]["content_fingerprint"] != second["model"]["content_fingerprint"]
    assert first["model"]["fingerprint"] == second["model"]["fingerprint"]  # same config and tensor index
    assert second["tasks"][choice_spec]["answers"]["cached"] == 0  # new weights never reuse stale answers


def test_a_named_fingerprint_is_not_reused_across_dtypes_or_generation_configs(tiny, tmp_path, jsonl):
    """The caller names the weights; dtype, EOS ids and the device still change answers, so they key the cache too."""
    import copy

    import torch

    model, tokenizer = tiny
    data = jsonl(tmp_path / "qa.jsonl", [{"prompt": "hello", "answer": "x"}, {"prompt": "model", "answer": "y"}])
    spec = f"generate:data={data},max_new_tokens=3"
    cache = ResultCache(tmp_path / "cache")
    answers = lambda results: results["tasks"][spec]["answers"]
    assert answers(evaluate(model, tokenizer, [spec], cache=cache, fingerprint="my-weights")) == {"cached": 0, "computed": 2}
    assert answers(evaluate(model, tokenizer, [spec], cache=cache, fingerprint="my-weights")) == {"cached": 2, "computed": 0}
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert answers(evaluate(half, tokenizer, [spec], cache=cache, fingerprint="my-weights"))["cached"] == 0
    other_eos = copy.deepcopy(model)
    other_eos.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    assert answers(evaluate(other_eos, tokenizer, [spec], cache=cache, fingerprint="my-weights"))["cached"] == 0
    uncached = evaluate(model, tokenizer, [spec])
    assert uncached["model"]["content_fingerprint"] is None  # no cache: no weight hashed
    assert uncached["model"]["fingerprint"] == fingerprint_module(model, tokenizer, content=False)


def test_summaries():
    import math
    import random

    import numpy as np

    values = [1, 0, 1, 1, 0, 1, 1, 1]
    summary = summarize_mean(values, seed=0)
    assert summary["value"] == 0.75 and summary["n"] == 8
    assert summary["stderr"] == pytest.approx((0.75 * 0.25 * 8 / 7) ** 0.5 / 8 ** 0.5)
    assert summary == summarize_mean(values, seed=0)
    assert summarize_mean([1.0])["ci95"] is None
    ratio = summarize_ratio([2.0, 4.0], [1.0, 3.0])
    assert ratio["value"] == pytest.approx(1.5)
    # With many items the bootstrap interval approaches the normal one, value ± 1.96 stderr (central limit theorem).
    rng = random.Random(0)
    many = [float(rng.random() < 0.3) for _ in range(2000)]
    summary = summarize_mean(many, seed=1)
    low, high = summary["ci95"]
    assert low == pytest.approx(summary["value"] - 1.96 * summary["stderr"], abs=0.006)
    assert high == pytest.approx(summary["value"] + 1.96 * summary["stderr"], abs=0.006)
    # A ratio with unit denominators is a mean: the same value, interval and (bootstrap) stderr.
    as_ratio = summarize_ratio(many, [1.0] * len(many), seed=1)
    assert as_ratio["value"] == pytest.approx(summary["value"])
    assert as_ratio["ci95"] == pytest.approx(summary["ci95"])
    assert as_ratio["stderr"] == pytest.approx(summary["stderr"], rel=0.1)
    # Perplexity: exp of the token-weighted mean NLL, and its interval is the exp of the NLL's.
    nll, tokens = [rng.uniform(10, 40) for _ in range(50)], [rng.randint(5, 20) for _ in range(50)]
    perplexity = summarize_ratio(nll, tokens, np.exp, seed=2)
    per_token = summarize_ratio(nll, tokens, seed=2)
    assert perplexity["value"] == pytest.approx(math.exp(sum(nll) / sum(tokens)))
    assert perplexity["ci95"] == pytest.approx([math.exp(bound) for bound in per_token["ci95"]])


def test_write_results_is_atomic_and_checks_the_directory(tmp_path):
    target = tmp_path / "r.json"
    target.write_text('{"old": true}')
    with pytest.raises(TypeError):
        write_results({"format": "x", "bad": object()}, target)
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    with pytest.raises(ConfigError, match="does not exist"):
        write_results({}, tmp_path / "missing" / "r.json")


def test_write_results_without_overwrite_never_replaces_a_file(tmp_path, monkeypatch):
    from mergelab.evaluate import results as results_module

    target = tmp_path / "r.json"
    target.write_text("theirs")
    with pytest.raises(ConfigError, match="already exists"):
        write_results({"format": "x"}, target, overwrite=False)
    assert target.read_text() == "theirs"
    target.unlink()
    real = results_module._jsonable

    def another_process_writes_it_meanwhile(value):
        target.write_text("theirs")
        return real(value)

    monkeypatch.setattr(results_module, "_jsonable", another_process_writes_it_meanwhile)
    with pytest.raises(ConfigError, match="appeared while the evaluation ran"):
        write_results({"format": "x"}, target, overwrite=False)
    assert target.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary left behind
    monkeypatch.setattr(results_module, "_jsonable", real)
    target.unlink()
    write_results({"format": "x"}, target, overwrite=False)
    assert json.loads(target.read_text()) == {"format": "x"}
    write_results({"format": "y"}, target)  # overwrite=True replaces
    assert json.loads(target.read_text()) == {"format": "y"}


def synthetic_results(scores: list[float], inputs: list[str], stderr: float) -> dict:
    mean = sum(scores) / len(scores)
    return {"tasks": {"t": {"task": "choice", "metrics": {"acc": {"value": mean, "stderr": stderr, "ci95": None,
                                                               "n": len(scores)}},
                            "items": [{"input": i, "scores": {"acc": s}} for i, s in zip(inputs, scores)]}}}


def test_compare_intervals_by_hand():
    inputs = [f"q{i}" for i in range(10)]
    a = synthetic_results([0.0] * 10, inputs, 0.1)
    b = synthetic_results([1.0] * 10, inputs, 0.2)
    [row] = compare_results(a, b)
    # Paired: every item gains exactly 1, so every bootstrap replicate of the mean gain is 1.
    assert (row["method"], row["diff"], row["diff_ci95"], row["significant"]) == ("paired bootstrap", 1.0, [1.0, 1.0], True)
    shifted = synthetic_results([0.0] * 5 + [1.0] * 5, inputs, 0.1)
    flipped = synthetic_results([1.0] * 5 + [0.0] * 5, inputs, 0.1)
    [row] = compare_results(shifted, flipped)
    assert row["diff"] == 0.0 and row["diff_ci95"][0] < 0 < row["diff_ci95"][1] and row["significant"] is False
    # Different items: unpaired, B − A ± 1.96 √(se_A² + se_B²).
    other = synthetic_results([1.0] * 10, [f"other{i}" for i in range(10)], 0.2)
    [row] = compare_results(a, other)
    spread = 1.96 * (0.1 ** 2 + 0.2 ** 2) ** 0.5
    assert row["method"] == "unpaired stderr"
    assert row["diff_ci95"] == pytest.approx([1.0 - spread, 1.0 + spread])
    assert row["significant"] is True


def test_compare_reports_differences_against_intervals(tiny_dir, choice_spec, tmp_path):
    variant = make_variant(tiny_dir, tmp_path / "variant", seed=9, scale=0.5)
    a = evaluate_directory(str(tiny_dir), [choice_spec], cache=False)
    b = evaluate_directory(str(variant), [choice_spec], cache=False)
    rows = compare_results(a, b)
    assert [r["metric"] for r in rows] == ["acc", "acc_norm"]
    row = rows[0]
    assert row["method"] == "paired bootstrap"
    assert row["diff"] == pytest.approx(b["tasks"][choice_spec]["metrics"]["acc"]["value"] - a["tasks"][choice_spec]["metrics"]["acc"]["value"])
    assert row["significant"] == (row["diff_ci95"][0] > 0 or row["diff_ci95"][1] < 0)
    same = compare_results(a, a)
    assert same[0]["diff"] == 0 and same[0]["significant"] is False
    table = format_comparison(rows, "base.json", "variant.json")
    assert "acc_norm" in table and "significant" in table and "base.json" in table



def test_a_task_made_from_a_spec_is_named_as_written(tiny, mmlu_files, tmp_path):
    """evaluate() names results by the spec as the user wrote it, as `mergelab eval --task` does, so that
    --compare pairs a results file written from Python with one written by the CLI."""
    from mergelab.evaluate import make_task
    from mergelab.evaluate.tasks import ChoiceTask

    written = f"choice:style=text,data={mmlu_files['test']}"  # not the canonical order of the options
    task = make_task(written)
    assert task.spec == written
    assert make_task(f"generate:data={tmp_path / 'x.jsonl'},chat=true").spec.endswith("chat=true")  # not chat=True
    model, tokenizer = tiny
    assert list(evaluate(model, tokenizer, [task], limit=2)["tasks"]) == [written]
    canonical = ChoiceTask(data=str(mmlu_files["test"]), style="text").spec  # a task built in code
    assert canonical == f"choice:data={mmlu_files['test']},style=text" and make_task(canonical).spec == canonical
