"""Bad evaluation options: a clear error naming the option or path, raised before any work, nothing written.

"Before any work" is shown by giving a model and a data file that do not exist: an error
about them would mean the option was checked too late.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.errors import ConfigError, InputError
from mergelab.evaluate import evaluate_directory, make_task, write_results
from mergelab.evaluate.cache import ResultCache


def evaluate_nothing(tmp_path, **options):
    """evaluate_directory on a model and data that do not exist: only an early check can fail first."""
    return evaluate_directory(str(tmp_path / "no-model"), [f"choice:data={tmp_path / 'no-data.jsonl'}"], **options)


# ---- --out ------------------------------------------------------------------------------------------------------
def test_out_that_is_a_directory_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=f"the results file '{folder}' is a directory; give a file name"):
        evaluate_nothing(tmp_path, out=folder, overwrite=True, cache=cache)
    assert not cache.exists() and list(folder.iterdir()) == []


def test_out_in_a_missing_directory_or_existing_without_overwrite_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="the directory of the results file .* does not exist"):
        evaluate_nothing(tmp_path, out=tmp_path / "missing" / "r.json", cache=False)
    existing = tmp_path / "r.json"
    existing.write_text("theirs")
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        evaluate_nothing(tmp_path, out=existing, cache=False)
    assert existing.read_text() == "theirs"


def test_write_results_refuses_a_directory_clearly(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        write_results({"format": "x"}, tmp_path, overwrite=True)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_directory_writes_out(tmp_path, tiny_dir, jsonl, make_mmlu_rows):
    data = jsonl(tmp_path / "q.jsonl", make_mmlu_rows(2, seed=1))
    out = tmp_path / "r.json"
    results = evaluate_directory(str(tiny_dir), [f"choice:data={data}"], cache=False, out=out)
    assert json.loads(out.read_text())["tasks"] == json.loads(json.dumps(results["tasks"]))


def test_eval_out_directory_with_force_exits_2_without_a_traceback(tmp_path, tiny_dir, jsonl, make_mmlu_rows):
    data = jsonl(tmp_path / "q.jsonl", make_mmlu_rows(2, seed=1))
    folder = tmp_path / "results"
    folder.mkdir()
    result = CliRunner().invoke(app, ["eval", str(tiny_dir), "--task", f"choice:data={data}", "--no-cache",
                                      "--out", str(folder), "--force"])
    assert result.exit_code == 2 and "is a directory" in result.output, result.output
    assert "Traceback" not in result.output and list(folder.iterdir()) == []


# ---- --cache-dir ----------------------------------------------------------------------------------------------------
def test_cache_dir_that_is_a_file_or_cannot_be_created_names_the_path(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(InputError, match=f"result cache directory '{a_file}' is a file, not a directory"):
        evaluate_nothing(tmp_path, cache=a_file)
    below_a_file = a_file / "cache"
    with pytest.raises(InputError, match=f"result cache directory '{below_a_file}' cannot be created"):
        evaluate_nothing(tmp_path, cache=below_a_file)
    with pytest.raises(InputError, match="--cache-dir"):
        ResultCache(below_a_file)


def test_cache_dir_errors_through_the_cli(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "no-model"), "--task", "choice:data=x.jsonl",
                                      "--cache-dir", str(a_file)])
    assert result.exit_code == 2 and f"'{a_file}' is a file" in result.output and "Traceback" not in result.output


# ---- counting options -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option,value,message", [
    ("limit", -1, r"limit \(--limit\) is -1; it must be at least 1"),
    ("limit", 0, r"limit \(--limit\) is 0; it must be at least 1"),
    ("num_fewshot", -1, r"num_fewshot \(--num-fewshot\) is -1; it must be at least 0"),
    ("batch_size", 0, r"batch_size \(--batch-size\) is 0; it must be at least 1"),
])
def test_evaluation_options_are_checked_before_any_work(tmp_path, option, value, message):
    with pytest.raises(ConfigError, match=message):
        evaluate_nothing(tmp_path, cache=False, **{option: value})


@pytest.mark.parametrize("arguments,message", [
    (["--limit", "-1"], "limit (--limit) is -1"),
    (["--num-fewshot", "-1"], "num_fewshot (--num-fewshot) is -1"),
])
def test_bad_counts_through_the_cli(tmp_path, arguments, message):
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "no-model"), "--task", "choice:data=x.jsonl",
                                      "--no-cache", *arguments])
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize("spec,message", [
    ("perplexity:data=x.txt,stride=0", "task 'perplexity': option 'stride' is 0; it must be at least 1"),
    ("perplexity:data=x.txt,max_length=0", "task 'perplexity': option 'max_length' is 0; it must be at least 2"),
    ("perplexity:data=x.txt,max_length=1", "option 'max_length' is 1; it must be at least 2 (a perplexity window"),
    ("choice:data=x.jsonl,num_fewshot=-1", "task 'choice': option 'num_fewshot' is -1; it must be at least 0"),
    ("generate:data=x.jsonl,num_fewshot=-3", "task 'generate': option 'num_fewshot' is -3"),
])
def test_task_options_are_checked_when_the_spec_is_read(spec, message):
    with pytest.raises(ConfigError) as raised:
        make_task(spec)
    assert message in str(raised.value)


def test_perplexity_stride_longer_than_the_window_is_refused_before_reading_data(tmp_path):
    task = make_task(f"perplexity:data={tmp_path / 'missing.txt'},max_length=8,stride=9")
    with pytest.raises(ConfigError, match=r"option 'stride' \(9\) is larger than 'max_length' \(8\)"):
        task.load()


def test_runner_treats_zero_as_a_value_not_as_the_default(tiny):
    from mergelab.evaluate import Runner

    model, tokenizer = tiny
    runner = Runner(model, tokenizer)
    window = min(runner.max_length, 2048)
    assert runner.perplexity_settings(None, None) == (window, window // 2)  # None is the default
    with pytest.raises(ConfigError, match="max_length is 0; it must be at least 2"):
        runner.perplexity_settings(0, None)
    with pytest.raises(ConfigError, match="max_length is 1; it must be at least 2"):
        runner.perplexity_settings(1, None)
    with pytest.raises(ConfigError, match=r"stride must be in 1..max_length \(8\), got 0"):
        runner.perplexity_settings(8, 0)
    assert runner.perplexity_settings(2, 1) == (2, 1)


def test_perplexity_with_a_two_token_window_scores_every_token_after_the_first(tiny, tmp_path):
    from mergelab.evaluate import evaluate

    text = tmp_path / "t.txt"
    text.write_text("alpha beta gamma delta")
    model, tokenizer = tiny
    spec = f"perplexity:data={text},max_length=2,stride=1"
    result = evaluate(model, tokenizer, [spec])["tasks"][spec]
    tokens = len(tokenizer(text.read_text())["input_ids"])
    assert result["info"]["tokens"] == tokens - 1 and result["info"]["max_length"] == 2


# ---- adapters that are not plain LoRA ---------------------------------------------------------------------------------
def test_eval_of_an_alora_adapter_is_refused_by_name_before_the_model_loads(tiny_dir, tmp_path, jsonl, make_mmlu_rows):
    import torch
    from peft import LoraConfig, get_peft_model

    from mergelab.evaluate import load_model

    base, _ = load_model(tiny_dir)
    torch.manual_seed(0)
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              task_type="CAUSAL_LM", alora_invocation_tokens=[7, 8]))
    adapter = tmp_path / "alora"
    adapted.save_pretrained(adapter)
    data = jsonl(tmp_path / "q.jsonl", make_mmlu_rows(2, seed=1))
    loaded = []
    with pytest.raises(InputError, match=r"alora_invocation_tokens is set \(\[7, 8\]\).*cannot be merged"):
        evaluate_directory(str(tiny_dir), [f"choice:data={data}"], adapters=[str(adapter)], cache=False,
                           runner_hook=loaded.append)
    assert loaded == []  # refused while the adapters were validated, before any runner existed
    result = CliRunner().invoke(app, ["eval", str(tiny_dir), "--task", f"choice:data={data}", "--no-cache",
                                      "--adapter", str(adapter)])
    assert result.exit_code == 2 and "alora_invocation_tokens is set" in result.output, result.output
