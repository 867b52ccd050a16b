"""``--device cuda``: answers on the GPU agree with the CPU's (skipped without a GPU); without one, a clear error."""

from __future__ import annotations

import pytest
import torch

from mergelab.errors import ConfigError
from mergelab.evaluate import GenerationParams, GenerationRequest, Runner, evaluate_directory, load_model


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny_dir, mmlu_files, tmp_path):
    spec = f"choice:data={mmlu_files['test']},style=text"
    cpu = evaluate_directory(str(tiny_dir), [spec], cache=False, device="cpu")
    gpu = evaluate_directory(str(tiny_dir), [spec], cache=False, device="cuda")
    ours = [v for i in gpu["tasks"][spec]["items"] for v in i["output"]["loglikelihoods"]]
    reference = [v for i in cpu["tasks"][spec]["items"] for v in i["output"]["loglikelihoods"]]
    assert ours == pytest.approx(reference, abs=1e-3)
    model, tokenizer = load_model(tiny_dir, device="cuda")
    params = GenerationParams(max_new_tokens=6, temperature=0.8)
    first = Runner(model, tokenizer, seed=3).generate([GenerationRequest("hello", params, sample=i) for i in range(3)])
    again = Runner(model, tokenizer, seed=3, batch_size=1).generate([GenerationRequest("hello", params, sample=i) for i in range(3)])
    assert first == again


def test_cuda_without_a_gpu_is_a_clear_error(tiny_dir, mmlu_files):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="no CUDA device"):
        evaluate_directory(str(tiny_dir), [f"choice:data={mmlu_files['test']}"], cache=False, device="cuda")
