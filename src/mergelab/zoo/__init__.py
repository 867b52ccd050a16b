"""Models to try mergelab on without downloads.

``random_models`` builds tiny random (or perturbed) checkpoints of real architectures:
the fixtures of the test suite, the benchmark inputs and the quick demo.
"""
