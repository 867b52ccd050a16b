"""`mergelab eval`: the command line end to end, including Ctrl-C and resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mergelab.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, ["eval", *args])


def test_eval_writes_results_and_compare_prints_a_table(tiny_dir, tiny, mmlu_files, tmp_path):
    from mergelab.evaluate import evaluate

    spec = f"choice:data={mmlu_files['test']},dev={mmlu_files['dev']}"
    first = invoke(str(tiny_dir), "--task", spec, "--num-fewshot", "1", "--batch-size", "8", "--seed", "4",
                   "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "a.json"))
    assert first.exit_code == 0, first.output
    results = json.loads((tmp_path / "a.json").read_text())
    assert results["settings"]["num_fewshot"] == 1 and results["settings"]["seed"] == 4
    assert results["tasks"][spec]["info"]["num_fewshot"] == 1
    acc = results["tasks"][spec]["metrics"]["acc"]
    printed = (f"{spec}  acc = {acc['value']:.4f} ± {acc['stderr']:.4f}  "
               f"95% CI [{acc['ci95'][0]:.4f}, {acc['ci95'][1]:.4f}]  (n=24)")
    assert printed in first.output  # what is printed is what is written
    model, tokenizer = tiny
    in_memory = evaluate(model, tokenizer, [spec], num_fewshot=1, seed=4)["tasks"][spec]
    assert results["tasks"][spec]["metrics"] == in_memory["metrics"]
    second = invoke(str(tiny_dir), "--task", spec, "--limit", "10", "--no-cache", "--out", str(tmp_path / "b.json"))
    assert second.exit_code == 0, second.output
    table = invoke("--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert table.exit_code == 0, table.output
    b_acc = json.loads((tmp_path / "b.json").read_text())["tasks"][spec]["metrics"]["acc"]["value"]
    [acc_line] = [line for line in table.output.splitlines() if line.startswith(spec) and "  acc  " in line]
    assert f"{acc['value']:.4f}" in acc_line and f"{b_acc:.4f}" in acc_line
    assert f"{b_acc - acc['value']:+.4f}" in acc_line and "unpaired stderr" in acc_line  # 10 vs 24 items: unpaired


def test_scoring_given_humaneval_samples_without_a_model(tmp_path, jsonl):
    from mergelab.evaluate.tasks.humaneval import bundled_problems_path
    import gzip

    with gzip.open(bundled_problems_path(), "rt") as handle:
        problem = json.loads(handle.readline())
    samples = jsonl(tmp_path / "samples.jsonl", [{"task_id": problem["task_id"], "completion": problem["canonical_solution"]}])
    result = invoke("--task", "humaneval", "--samples", str(samples), "--limit", "1", "--out", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    assert "pass@1 = 1.0000" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["model"]["path"] is None
    (tmp_path / "r.json").write_text("keep me")
    again = invoke("--task", "humaneval", "--samples", str(samples), "--limit", "1", "--out", str(tmp_path / "r.json"))
    assert again.exit_code == 2 and "already exists; pass --force" in again.output
    # The samples as a task option work the same; a model is refused, since it would not be evaluated.
    option = invoke("--task", f"humaneval:samples={samples}", "--limit", "1")
    assert option.exit_code == 0 and "pass@1 = 1.0000" in option.output, option.output
    with_model = invoke("some-model-dir", "--task", f"humaneval:samples={samples}", "--limit", "1")
    assert with_model.exit_code == 2 and "the model would not be evaluated" in with_model.output, with_model.output
    nothing = invoke("--task", "humaneval", "--limit", "1")  # generations need a model: said before any work
    assert nothing.exit_code == 2 and "give a model directory" in nothing.output
    assert (tmp_path / "r.json").read_text() == "keep me"
    forced = invoke("--task", "humaneval", "--samples", str(samples), "--limit", "1", "--out", str(tmp_path / "r.json"),
                    "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((tmp_path / "r.json").read_text())["format"] == "mergelab.eval/1"


def test_compare_takes_two_results_files_and_nothing_else(tmp_path):
    result = invoke("some-model-dir", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert result.exit_code == 2 and "evaluates nothing" in result.output

def test_an_out_file_that_appears_during_the_run_is_not_replaced(tmp_path, jsonl, monkeypatch):
    from mergelab import evaluate as evaluation
    from mergelab.evaluate.tasks.humaneval import bundled_problems_path
    import gzip

    with gzip.open(bundled_problems_path(), "rt") as handle:
        problem = json.loads(handle.readline())
    samples = jsonl(tmp_path / "samples.jsonl", [{"task_id": problem["task_id"], "completion": problem["canonical_solution"]}])
    from mergelab.evaluate import api

    out = tmp_path / "r.json"
    real = api.run_tasks

    def someone_else_writes_the_file(*args, **kwargs):
        results = real(*args, **kwargs)
        out.write_text("written by another run")
        return results

    monkeypatch.setattr(api, "run_tasks", someone_else_writes_the_file)
    result = invoke("--task", "humaneval", "--samples", str(samples), "--limit", "1", "--out", str(out))
    assert result.exit_code == 2 and "already exists; pass --force" in result.output
    assert out.read_text() == "written by another run"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind


def test_bad_input_exits_2_with_file_and_line(tiny_dir, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": "oops", "answer": 0}\n')
    result = invoke(str(tiny_dir), "--task", f"choice:{broken}", "--no-cache", "--out", str(tmp_path / "r.json"))
    assert result.exit_code == 2
    assert "broken.jsonl:2" in result.output and "choices" in result.output
    assert not (tmp_path / "r.json").exists()
    assert invoke("--task", "choice:x.jsonl").exit_code == 2  # no model
    missing_dir = invoke(str(tiny_dir), "--task", f"choice:{broken}", "--out", str(tmp_path / "no" / "r.json"))
    assert missing_dir.exit_code == 2 and "does not exist" in missing_dir.output
    folder = invoke(str(tiny_dir), "--task", "nonsense", "--out", str(tmp_path), "--force")  # refused before the task
    assert folder.exit_code == 2 and "is a directory" in folder.output
    unknown = invoke(str(tiny_dir), "--task", "nonsense", "--no-cache")
    assert unknown.exit_code == 2 and "unknown task 'nonsense'" in unknown.output


INTERRUPT_AFTER_TWO_BATCHES = """
import os, signal, sys
# Python's own Ctrl-C handler, even when this test runs in a background job (whose shell
# started it with SIGINT ignored, and then Python installs no handler at all).
signal.signal(signal.SIGINT, signal.default_int_handler)
from mergelab.evaluate import runner
stored = runner.Runner._store
batches = []

def store_then_interrupt(self, answers):
    stored(self, answers)
    batches.append(len(answers))
    if len(batches) == 2:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered right after the second batch was committed

runner.Runner._store = store_then_interrupt
from mergelab.cli import main
sys.argv = ["mergelab"] + sys.argv[1:]
main()
"""


@pytest.mark.slow
def test_ctrl_c_keeps_answers_and_the_rerun_resumes(tiny_dir, tmp_path, jsonl, make_mmlu_rows):
    data = jsonl(tmp_path / "many.jsonl", make_mmlu_rows(40, seed=5))
    cache = tmp_path / "cache"
    arguments = ["eval", str(tiny_dir), "--task", f"choice:{data}", "--batch-size", "4", "--cache-dir", str(cache),
                 "--out", str(tmp_path / "r.json")]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    interrupted = subprocess.run([sys.executable, "-c", INTERRUPT_AFTER_TWO_BATCHES, *arguments], capture_output=True,
                                 text=True, timeout=300, env=environment)
    assert interrupted.returncode == 130, interrupted.stderr
    assert "rerun the same command to resume" in interrupted.stderr
    assert not (tmp_path / "r.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "mergelab.cli", *arguments], capture_output=True, text=True,
                             timeout=300, env=environment)
    assert resumed.returncode == 0, resumed.stderr
    answers = json.loads((tmp_path / "r.json").read_text())["tasks"][f"choice:{data}"]["answers"]
    assert answers == {"cached": 2 * 4 * 4, "computed": (40 - 8) * 4}  # two batches of 4 questions x 4 options kept
