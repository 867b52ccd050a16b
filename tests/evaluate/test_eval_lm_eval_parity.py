"""mergelab's log-likelihoods and accuracy equal lm-evaluation-harness's on the same model and MMLU-format file.

lm-eval runs in-process (HFLM on the local model directory) with a custom task YAML found
through ``include_path``; its dataset is the same local JSONL, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TOLERANCE = 1e-4

LETTERS_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  cache_dir: {cache}
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about anatomy.\\n\\n"
doc_to_text: {doc_to_text}
doc_to_choice: {doc_to_choice}
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""
MMLU_TEXT = '"{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"'
CLOZE_TEXT = '"{{question.strip()}}\\nAnswer:"'


def run_lm_eval(model_dir: Path, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks_dir = tmp_path / "lm_eval_tasks"
    tasks_dir.mkdir()
    for name, text, choices in (("ml_letters", MMLU_TEXT, '["A", "B", "C", "D"]'), ("ml_cloze", CLOZE_TEXT, '"{{choices}}"')):
        (tasks_dir / f"{name}.yaml").write_text(LETTERS_YAML.format(
            name=name, test=files["test"], dev=files["dev"], doc_to_text=text, doc_to_choice=choices,
            cache=tmp_path / "hf-datasets"))
    lm = HFLM(pretrained=str(model_dir), batch_size=4, device="cpu")
    output = simple_evaluate(model=lm, tasks=["ml_letters", "ml_cloze"], task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                             num_fewshot=2, log_samples=True)
    return output


@pytest.mark.slow
def test_choice_loglikelihoods_and_acc_equal_lm_eval(tiny_dir, tiny, mmlu_files, tmp_path, monkeypatch):
    from mergelab.evaluate import evaluate

    reference = run_lm_eval(tiny_dir, mmlu_files, tmp_path, monkeypatch)
    model, tokenizer = tiny
    specs = {
        "ml_letters": f"choice:data={mmlu_files['test']},dev={mmlu_files['dev']}",
        "ml_cloze": f"choice:data={mmlu_files['test']},dev={mmlu_files['dev']},style=text",
    }
    ours = evaluate(model, tokenizer, list(specs.values()), num_fewshot=2, batch_size=3)
    for lm_task, spec in specs.items():
        samples = sorted(reference["samples"][lm_task], key=lambda s: s["doc_id"])
        items = ours["tasks"][spec]["items"]
        assert len(samples) == len(items) == 24
        multi_token = 0
        for sample, item in zip(samples, items):
            theirs = [float(resp[0]) for resp in sample["filtered_resps"]]
            assert item["output"]["loglikelihoods"] == pytest.approx(theirs, abs=TOLERANCE)
            assert item["output"]["is_greedy"] == [bool(resp[1]) for resp in sample["filtered_resps"]]
            assert item["scores"]["acc"] == sample["acc"]
            assert item["scores"]["acc_norm"] == sample["acc_norm"]
            multi_token += sum(len(tokenizer.encode(" " + c)) > 1 for c in sample["doc"]["choices"])
        metrics = ours["tasks"][spec]["metrics"]
        assert metrics["acc"]["value"] == pytest.approx(reference["results"][lm_task]["acc,none"], abs=1e-12)
        assert metrics["acc_norm"]["value"] == pytest.approx(reference["results"][lm_task]["acc_norm,none"], abs=1e-12)
        assert metrics["acc"]["stderr"] == pytest.approx(reference["results"][lm_task]["acc_stderr,none"], rel=1e-9)
        if lm_task == "ml_cloze":
            assert multi_token > 0  # the cloze task exercises continuations on top of the shared context cache


@pytest.mark.slow
def test_the_empty_context_prefix_token_is_lm_evals_with_and_without_bos(tiny):
    """lm-eval conditions an empty context on BOS, else EOS (HFLM.prefix_token_id); so does the runner."""
    import copy

    from lm_eval.models.huggingface import HFLM

    from mergelab.evaluate import Runner

    model, tokenizer = tiny
    no_bos = copy.deepcopy(tokenizer)
    no_bos.bos_token = None
    for candidate in (tokenizer, no_bos):
        reference = HFLM(pretrained=model, tokenizer=candidate, batch_size=1).prefix_token_id
        assert Runner(model, candidate).encode_pair("", "hello")[0] == [reference]
    assert HFLM(pretrained=model, tokenizer=no_bos, batch_size=1).prefix_token_id == tokenizer.eos_token_id
