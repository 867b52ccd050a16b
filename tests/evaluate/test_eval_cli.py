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


def test_eval_writes_results_and_compare_prints_a_table(tiny_dir, mmlu_files, tmp_path):
    spec = f"choice:data={mmlu_files['test']},dev={mmlu_files['dev']}"
    first = invoke(str(tiny_dir), "--task", spec, "--num-fewshot", "1", "--batch-size", "8", "--seed", "4",
                   "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "a.json"))
    assert first.exit_code == 0, first.output
    assert "acc = " in first.output and "95% CI" in first.output and "items/s" in first.output
    results = json.loads((tmp_path / "a.json").read_text())
    assert results["settings"]["num_fewshot"] == 1 and results["settings"]["seed"] == 4
    assert results["tasks"][spec]["info"]["num_fewshot"] == 1
    second = invoke(str(tiny_dir), "--task", spec, "--limit", "10", "--no-cache", "--out", str(tmp_path / "b.json"))
    assert second.exit_code == 0, second.output
    table = invoke("--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert table.exit_code == 0, table.output
    assert "acc_norm" in table.output and "significant" in table.output


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
    assert (tmp_path / "r.json").read_text() == "keep me"
    forced = invoke("--task", "humaneval", "--samples", str(samples), "--limit", "1", "--out", str(tmp_path / "r.json"),
                    "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((tmp_path / "r.json").read_text())["format"] == "mergelab.eval/1"


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
    unknown = invoke(str(tiny_dir), "--task", "nonsense", "--no-cache")
    assert unknown.exit_code == 2 and "unknown task 'nonsense'" in unknown.output


INTERRUPT_AFTER_TWO_BATCHES = """
import os, signal, sys
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
