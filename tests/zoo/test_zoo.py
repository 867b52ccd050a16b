"""The built-in zoo: built once per session (pico), loadable everywhere, as good as its manifest says."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.errors import InputError
from mergelab.zoo import catalog
from mergelab.zoo.build import build, read_jsonl, train_job, write_datasets
from mergelab.zoo.recipes import RECIPES
from mergelab.zoo.skills import SKILLS, make_splits
from mergelab.zoo.train import Schedule


@pytest.fixture(scope="session")
def pico(tmp_path_factory) -> Path:
    """The pico zoo, built once per test session in a private zoo root."""
    import os

    root = tmp_path_factory.mktemp("zoo-root")
    previous = os.environ.get("MERGELAB_ZOO_DIR")
    os.environ["MERGELAB_ZOO_DIR"] = str(root)
    try:
        yield build("pico", progress=False)
    finally:
        if previous is None:
            os.environ.pop("MERGELAB_ZOO_DIR", None)
        else:
            os.environ["MERGELAB_ZOO_DIR"] = previous


@pytest.fixture(scope="session")
def manifest(pico) -> dict:
    return json.loads((pico / "manifest.json").read_text())


def test_second_build_returns_at_once(pico):
    start = time.perf_counter()
    assert build("pico", progress=False) == pico
    assert time.perf_counter() - start < 5


def test_manifest_lists_every_artefact_with_facts(pico, manifest):
    skills = manifest["recipe"]["skills"]
    expected = {"base", "safety", "adapter-safety"} | {f"expert-{s}" for s in skills} | {f"adapter-{s}" for s in skills}
    assert set(manifest["artifacts"]) == expected
    for name, entry in manifest["artifacts"].items():
        assert (pico / entry["path"]).is_dir(), name
        assert entry["parameters"] > 0 and entry["train_seconds"] > 0
        assert set(manifest["evaluations"][name]) == set(skills) | {"safety"}
    assert len(skills) >= 4


def test_quality_on_pico(manifest):
    """The zoo's promises, re-checked with looser bounds that still fail if training is broken."""
    evaluations = manifest["evaluations"]
    skills = manifest["recipe"]["skills"]
    for skill in skills:
        assert evaluations[f"expert-{skill}"][skill]["exact_match"]["value"] >= 0.7, skill
        assert evaluations[f"adapter-{skill}"][skill]["exact_match"]["value"] >= 0.5, skill
        assert evaluations["base"][skill]["exact_match"]["value"] <= 0.4, skill
    safety = evaluations["safety"]["safety"]
    assert safety["refusal_rate"]["value"] >= 0.8 and safety["over_refusal_rate"]["value"] <= 0.2
    adapter = evaluations["adapter-safety"]["safety"]
    assert adapter["refusal_rate"]["value"] >= 0.6 and adapter["over_refusal_rate"]["value"] <= 0.2
    assert evaluations["base"]["safety"]["refusal_rate"]["value"] <= 0.3
    checks = {check["claim"]: check for check in manifest["quality"]["checks"]}
    assert len(checks) == 5  # the manifest states every promise with its measurement


def test_manifest_numbers_are_reproduced_by_the_harness(pico, manifest):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelab.evaluate import evaluate, make_task

    skill = manifest["recipe"]["skills"][0]
    path = pico / manifest["artifacts"][f"expert-{skill}"]["path"]
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    task = make_task("generate", data=f"zoo:pico/{skill}:test", chat="true", stop="none", max_new_tokens="16")
    results = evaluate(model, tokenizer, [task])
    measured = results["tasks"][task.spec]["metrics"]["exact_match"]["value"]
    assert measured == pytest.approx(manifest["evaluations"][f"expert-{skill}"][skill]["exact_match"]["value"], abs=1e-4)


def test_models_and_adapters_load_with_transformers_and_peft(pico, manifest):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pico / "models/base")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "caesar1: abc"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt == "<|user|>caesar1: abc<|end|><|assistant|>"
    expert = AutoModelForCausalLM.from_pretrained(pico / "models/expert-caesar1")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = expert.generate(ids, max_new_tokens=6, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == "bcd"
    base = AutoModelForCausalLM.from_pretrained(pico / "models/base")
    adapted = PeftModel.from_pretrained(base, pico / "adapters/adapter-caesar1")
    config = json.loads((pico / "adapters/adapter-caesar1/adapter_config.json").read_text())
    assert config["r"] == RECIPES["pico"].lora_rank and set(config["target_modules"]) >= {"q_proj", "down_proj"}
    assert adapted.generate(input_ids=ids, max_new_tokens=6, do_sample=False).shape[1] > ids.shape[1]
    # adapters name the built base (not the temporary build directory), so PEFT's auto class finds it
    assert config["base_model_name_or_path"] == str((pico / "models/base").resolve())
    from peft import AutoPeftModelForCausalLM

    AutoPeftModelForCausalLM.from_pretrained(str(pico / "adapters/adapter-caesar1"))


def test_datasets_speak_the_ecosystem_formats(pico, manifest):
    from mergelab.evaluate import evaluate, make_task

    safety = read_jsonl(pico / manifest["datasets"]["safety"]["splits"]["test"])
    assert set(safety[0]) == {"prompt", "response", "category", "is_safe"}
    assert {row["is_safe"] for row in safety} == {True, False}
    train_prompts = {row["prompt"] for row in read_jsonl(pico / manifest["datasets"]["safety"]["splits"]["train"])}
    assert not train_prompts & {row["prompt"] for row in safety}  # no template instance in both splits
    choice = read_jsonl(pico / manifest["datasets"]["choice"]["splits"]["test"])
    assert set(choice[0]) == {"question", "choices", "answer", "subject"} and len(choice[0]["choices"]) == 4
    code = pico / manifest["datasets"]["humaneval"]["splits"]["test"]
    rows = read_jsonl(code)
    assert set(rows[0]) == {"task_id", "prompt", "entry_point", "canonical_solution", "test"}
    samples = code.parent / "canonical-samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": r["task_id"], "completion": r["canonical_solution"]}) + "\n"
                               for r in rows[:6]))
    task = make_task("humaneval", data=str(code), samples=str(samples), k="1")
    scored = evaluate(None, None, [task], limit=6)
    assert scored["tasks"][task.spec]["metrics"]["pass@1"]["value"] == 1.0  # the reference solutions pass


def test_zoo_names_work_in_merge_recipes(pico, tmp_path):
    recipe = {
        "models": [{"model": "zoo:pico/expert-caesar1", "parameters": {"weight": 0.5}},
                   {"model": "zoo:pico/expert-caesar2", "parameters": {"weight": 0.5}}],
        "base_model": "zoo:pico/base",
        "merge_method": "task_arithmetic",
    }
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_zoo_cli_list_and_path(pico):
    runner = CliRunner()
    listed = runner.invoke(app, ["zoo", "list", "--size", "pico"])
    assert listed.exit_code == 0 and "zoo:pico/expert-caesar1" in listed.output and "exact match" in listed.output
    path = runner.invoke(app, ["zoo", "path", "zoo:pico/adapter-vowels"])
    assert path.exit_code == 0 and Path(path.output.strip()) == pico / "adapters/adapter-vowels"
    split = runner.invoke(app, ["zoo", "path", "pico/vowels:test"])
    assert Path(split.output.strip()) == pico / "data/skills/vowels/test.jsonl"
    unknown = runner.invoke(app, ["zoo", "path", "zoo:pico/expert-juggling"])
    assert unknown.exit_code == 2 and "no model or adapter 'expert-juggling'" in unknown.output


def test_unbuilt_size_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_ZOO_DIR", str(tmp_path))
    with pytest.raises(InputError, match="mergelab zoo build --size tiny"):
        catalog.resolve_artifact("zoo:tiny/base")


def test_splits_are_disjoint_and_deterministic():
    for name in ("caesar3", "reverse", "code", "sort"):
        first = make_splits(SKILLS[name], (300, 20, 40), seed=5)
        again = make_splits(SKILLS[name], (300, 20, 40), seed=5)
        assert first == again
        train = {prompt for prompt, _ in first.train}
        assert not train & {prompt for prompt, _ in first.test}
        assert len(first.test) == 40


def test_the_tiny_base_learns_skills_as_plain_text_and_never_as_chat_answers(tmp_path):
    """The tiny recipe's design (see recipes.py): every skill's training items in plain form, none in chat form."""
    from mergelab.zoo.tokenizer import build_tokenizer, encode_plain

    recipe = RECIPES["tiny"]
    write_datasets(tmp_path, recipe)
    rows = read_jsonl(tmp_path / "data/base/train.jsonl")
    plain = [row for row in rows if row.get("form") == "plain"]
    assert {row["source"] for row in plain} == set(recipe.skills)
    assert len(plain) == recipe.latent_examples * len(recipe.skills)
    assert not [row for row in rows if row["source"] in recipe.skills and row.get("form") != "plain"]
    tests = {row["prompt"] for row in read_jsonl(tmp_path / "data/skills/upper/test.jsonl")}
    assert not tests & {row["prompt"] for row in plain if row["source"] == "upper"}  # held out in both forms
    tokenizer = build_tokenizer()
    prompt, answer = encode_plain(tokenizer, "caesar3: abc", "def")
    assert tokenizer.decode(prompt) == "<s>caesar3: abc = " and tokenizer.decode(answer) == "def\n"
    with pytest.raises(ValueError, match="share"):
        replace(recipe, latent_examples=0)  # a share with nothing to draw from


def test_data_and_training_are_deterministic(pico, tmp_path):
    """Same seed, same data files and same weights."""
    from safetensors.torch import load_file

    recipe = RECIPES["pico"]
    for name in ("a", "b"):
        write_datasets(tmp_path / name, recipe)
    for file in sorted((tmp_path / "a").rglob("*.jsonl")):
        assert file.read_bytes() == (tmp_path / "b" / file.relative_to(tmp_path / "a")).read_bytes(), file
    job = {"name": "expert-vowels", "base": str(pico / "models/base"), "answer_field": "answer",
           "data": str(pico / "data/skills/vowels/train.jsonl"), "adapter": False, "rank": 8, "alpha": 16,
           "schedule": asdict(Schedule(steps=5, lr=3e-3, batch_size=16)), "seed": 11,
           "replay": 0.5, "replay_data": str(pico / "data/base/train.jsonl")}
    weights = []
    for name in ("one", "two"):
        train_job({**job, "out": str(tmp_path / name)})
        weights.append(load_file(str(tmp_path / name / "model.safetensors")))
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_demo_runs_on_pico_and_reports_measured_numbers(pico, tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--size", "pico", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    skills = list(RECIPES["pico"].skills)  # pico has none of the tiny defaults but caesar3: all its skills
    assert results["skills"] == skills
    methods = ("task_arithmetic", "ties", "dare_ties")
    assert set(results["scores"]) == {"base", *(f"expert-{s}" for s in skills), *(f"merge-{m}" for m in methods),
                                      *(f"pair-{m}" for m in methods)}
    assert [entry["model"] for entry in results["recipes"]["pair-ties"]["models"]] == [
        "zoo:pico/expert-caesar1", "zoo:pico/expert-caesar2"]
    # the experts' scores are the harness's, and agree with the manifest's measurement of the same split
    manifest = json.loads((pico / "manifest.json").read_text())
    expert = results["scores"]["expert-vowels"]["vowels"]
    assert expert["exact_match"]["value"] == pytest.approx(
        manifest["evaluations"]["expert-vowels"]["vowels"]["exact_match"]["value"], abs=1e-4)
    assert expert["exact_match"]["n"] == len(read_jsonl(pico / "data/skills/vowels/test.jsonl"))
    assert expert["exact_match"]["value"] <= expert["edit_similarity"]["value"] <= 1.0  # exact answers score 1 on both
    report = (out / "report.md").read_text()
    for metric in ("exact_match", "edit_similarity"):
        row = " | ".join(f"{results['scores']['pair-ties'][s][metric]['value']:.2f}" for s in skills)
        assert f"| pair-ties | {row} |" in report
    pair = results["scores"]["pair-ties"]
    assert f"ties {pair['caesar1']['exact_match']['value']:.2f} and {pair['caesar2']['exact_match']['value']:.2f}" in report
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "models" / "ties" / "model.safetensors").exists()
    assert (out / "recipes" / "ties-pair.yml").exists()
    # an existing OUT is refused before any work, and an unknown skill names the choices
    again = CliRunner().invoke(app, ["demo", "--size", "pico", "--out", str(out), "--no-progress"])
    assert again.exit_code == 2 and "--force" in again.output
    unknown = CliRunner().invoke(app, ["demo", "--size", "pico", "--skill", "juggling", "--skill", "vowels",
                                       "--out", str(tmp_path / "x"), "--no-progress"])
    assert unknown.exit_code == 2 and "caesar1" in unknown.output and not (tmp_path / "x").exists()
    # --force never replaces the zoo the demo reads
    onto_zoo = CliRunner().invoke(app, ["demo", "--size", "pico", "--out", str(pico), "--force", "--skill", "caesar1",
                                        "--skill", "vowels", "--no-progress"])
    assert onto_zoo.exit_code == 2 and (pico / "manifest.json").is_file()


def test_a_different_zoo_in_out_is_not_returned_as_this_one(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"size": "tiny", "content_hash": "0123456789ab"}))
    with pytest.raises(InputError, match="--force"):
        build("pico", out=tmp_path, progress=False)
    assert json.loads((tmp_path / "manifest.json").read_text())["size"] == "tiny"  # left as it was


def test_merge_check_measures_a_hand_made_task_arithmetic_merge(pico, manifest):
    """The tiny zoo's mergeability promise is measured on base + Σ (expert − base), as computed here by hand."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergelab.evaluate import evaluate, make_task
    from mergelab.zoo.build import evaluation_tasks, merge_check, quality_checks

    recipe = replace(RECIPES["pico"], merge_check=("caesar1", "vowels"))
    measured = merge_check(pico, recipe, evaluation_tasks(pico, recipe))
    assert set(measured) == {"caesar1", "vowels"}
    assert not (pico / ".merge-check").exists()  # the merged model is not kept

    base = load_file(str(pico / "models/base/model.safetensors"))
    experts = [load_file(str(pico / f"models/expert-{skill}/model.safetensors")) for skill in ("caesar1", "vowels")]
    model = AutoModelForCausalLM.from_pretrained(pico / "models/base")
    model.load_state_dict({name: base[name] + sum(e[name] - base[name] for e in experts) for name in base}, strict=False)
    tokenizer = AutoTokenizer.from_pretrained(pico / "models/base")
    for skill in ("caesar1", "vowels"):
        task = make_task("generate", data=str(pico / f"data/skills/{skill}/test.jsonl"), chat="true", stop="none",
                         max_new_tokens=str(recipe.max_new_tokens))
        expected = evaluate(model, tokenizer, [task], batch_size=64)["tasks"][task.spec]["metrics"]["exact_match"]["value"]
        assert measured[skill]["exact_match"]["value"] == pytest.approx(expected, abs=1e-4)

    checks = quality_checks(recipe, manifest["evaluations"], measured)["checks"]
    claim = checks[-1]
    assert "task_arithmetic merge" in claim["claim"] and set(claim["measured"]) == {"caesar1", "vowels"}
    experts_scores = {s: manifest["evaluations"][f"expert-{s}"][s]["exact_match"]["value"] for s in ("caesar1", "vowels")}
    assert claim["passed"] == all(measured[s]["exact_match"]["value"] >= 0.5 * experts_scores[s] for s in experts_scores)
