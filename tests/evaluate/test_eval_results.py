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
    format_comparison,
    read_results,
    write_results,
)
from mergelab.evaluate.results import summarize_mean, summarize_ratio
from mergelab.zoo.random_models import make_variant


@pytest.fixture(scope="module")
def choice_spec(mmlu_files):
    return f"choice:data={mmlu_files['test']}"


def test_results_json_has_metrics_intervals_items_and_provenance(tiny_dir, choice_spec, tmp_path):
    results = evaluate_directory(str(tiny_dir), [choice_spec], cache=tmp_path / "cache", seed=3, batch_size=5)
    path = write_results(results, tmp_path / "results.json")
    saved = read_results(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "results.json"]  # no temporary left behind
    assert saved["model"]["fingerprint"].startswith("sha256-index:") and saved["model"]["adapters"] == []
    assert saved["model"]["content_fingerprint"].startswith("sha256:")  # a cache was used, so the weights were hashed
    assert {"torch", "transformers", "mergelab", "python"} <= set(saved["versions"])
    assert saved["settings"]["seed"] == 3 and saved["settings"]["batch_size"] == 5
    assert saved["wall_seconds"] > 0 and saved["items_per_second"] > 0
    task = saved["tasks"][choice_spec]
    acc = task["metrics"]["acc"]
    assert set(acc) == {"value", "stderr", "ci95", "n"} and acc["n"] == 24
    assert acc["ci95"][0] <= acc["value"] <= acc["ci95"][1]
    assert task["items_per_second"] > 0 and task["wall_seconds"] > 0
    item = task["items"][0]
    assert {"input", "output", "scores", "target"} <= set(item)
    assert len(item["output"]["loglikelihoods"]) == 4
    assert "anatomy" in task["breakdown"]["subject"]


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


def test_summaries():
    values = [1, 0, 1, 1, 0, 1, 1, 1]
    summary = summarize_mean(values, seed=0)
    assert summary["value"] == 0.75 and summary["n"] == 8
    assert summary["stderr"] == pytest.approx((0.75 * 0.25 * 8 / 7) ** 0.5 / 8 ** 0.5)
    assert summary == summarize_mean(values, seed=0)
    assert summarize_mean([1.0])["ci95"] is None
    ratio = summarize_ratio([2.0, 4.0], [1.0, 3.0])
    assert ratio["value"] == pytest.approx(1.5)


def test_write_results_is_atomic_and_checks_the_directory(tmp_path):
    target = tmp_path / "r.json"
    target.write_text('{"old": true}')
    with pytest.raises(TypeError):
        write_results({"format": "x", "bad": object()}, target)
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    with pytest.raises(ConfigError, match="does not exist"):
        write_results({}, tmp_path / "missing" / "r.json")


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
