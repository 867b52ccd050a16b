"""``make demo``: merge two small checkpoints end to end and generate with the result.

Creates a tiny random Llama and a fine-tune-like variant of it under ``demo-out/``,
merges them with TIES through the same code path as ``mergelab merge``, prints where the
result is, then loads it with transformers and generates a few tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from mergelab.merge import MergeOptions, run_merge
from mergelab.zoo.random_models import make_model, make_variant


def main(root: str = "demo-out") -> Path:
    workdir = Path(root)
    workdir.mkdir(exist_ok=True)
    base = workdir / "base"
    if not base.exists():
        make_model(base, "llama", seed=0, hidden=64, layers=4, intermediate=128)
    variants = []
    for seed in (1, 2):
        variant = workdir / f"finetune-{seed}"
        if not variant.exists():
            make_variant(base, variant, seed=seed, scale=0.05, sparsity=0.5)
        variants.append(variant)
    recipe = {
        "models": [
            {"model": str(variants[0]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(variants[1]), "parameters": {"weight": [0.3, 0.9], "density": 0.5}},
        ],
        "base_model": str(base),
        "merge_method": "ties",
        "dtype": "float32",
    }
    recipe_path = workdir / "ties.yml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = run_merge(recipe_path, workdir / "merged", MergeOptions(force=True, seed=0))
    print(f"merged {result.tensors} tensors in {result.seconds:.2f} s -> {result.out_dir}")
    print(f"recipe: {recipe_path}")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(result.out_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.out_dir)
    prompt = "hello world"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    output = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(f"loaded with transformers ({model.num_parameters():,} parameters); greedy continuation of {prompt!r}:")
    print("  " + tokenizer.decode(output[0], skip_special_tokens=True))
    print("(the weights are random, so the words are too; the point is the pipeline)")
    return result.out_dir


if __name__ == "__main__":
    main(*sys.argv[1:])
