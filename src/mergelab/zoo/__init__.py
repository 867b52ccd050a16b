"""The built-in model zoo: tiny Llamas trained on synthetic skills, for offline experiments.

``mergelab zoo build --size tiny`` trains a tokenizer, a base model, one full fine-tune
and one LoRA adapter per skill, a safety-tuned model and adapter, and writes datasets in
the ecosystem's formats; ``zoo:tiny/expert-caesar3`` then names a model wherever a path
is expected. ``random_models`` builds tiny random checkpoints (test fixtures, benchmarks).
"""
