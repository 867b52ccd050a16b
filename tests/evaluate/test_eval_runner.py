"""The runner: log-likelihoods equal a plain forward pass, contexts run once, generation equals transformers'."""

from __future__ import annotations

import pytest
import torch

from mergelab.errors import InputError
from mergelab.evaluate import GenerationParams, GenerationRequest, Runner

REQUESTS = [
    ("The quick", " brown fox"),
    ("The quick", " red"),
    ("The quick ", "dog"),           # trailing space moves to the continuation
    ("model weight layer", " token"),
    ("a b c", " d e f g h"),
    ("", "hello world"),              # empty context: conditioned on BOS
]


def naive_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """One unpadded forward pass over context + continuation (lm-eval's token split)."""
    if context:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = tokenizer.encode(context + continuation)
        context_ids = tokenizer.encode(context)
        continuation_ids = whole[len(context_ids):]
    else:
        context_ids, continuation_ids = [tokenizer.bos_token_id], tokenizer.encode(continuation, add_special_tokens=False)
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = torch.tensor(continuation_ids)
    picked = logprobs[len(context_ids) - 1:].gather(1, targets[:, None]).squeeze(1)
    greedy = bool((logprobs[len(context_ids) - 1:].argmax(-1) == targets).all())
    return float(picked.sum()), greedy


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_loglikelihood_equals_plain_forward(tiny, batch_size):
    model, tokenizer = tiny
    answers = Runner(model, tokenizer, batch_size=batch_size).loglikelihood(REQUESTS)
    for (context, continuation), (logprob, greedy) in zip(REQUESTS, answers):
        expected, expected_greedy = naive_loglikelihood(model, tokenizer, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy


def test_each_distinct_context_is_encoded_once(tiny):
    model, tokenizer = tiny
    contexts = [f"question {i} model weight layer token answer:" for i in range(5)]
    requests = [(c, f" {letter}") for c in contexts for letter in "ABCD"]
    requests += [(contexts[0], " three layer token"), (contexts[1], " seven")]
    context_rows, tail_rows = [], []
    original = model.forward

    def counting_forward(*args, **kwargs):
        rows = kwargs["input_ids"].shape[0]
        (context_rows if kwargs.get("past_key_values") is None else tail_rows).append(rows)
        return original(*args, **kwargs)

    model.forward = counting_forward
    try:
        runner = Runner(model, tokenizer, batch_size=16)
        answers = runner.loglikelihood(requests)
    finally:
        del model.forward
    assert sum(context_rows) == len(contexts)  # 22 requests, 5 contexts, each encoded once
    pairs = [runner.encode_pair(c, x) for c, x in requests]
    shared_tails = {(tuple(c), tuple(x[:-1])) for c, x in pairs if len(x) > 1}
    assert sum(tail_rows) == len(shared_tails) < sum(len(x) > 1 for _, x in pairs)
    for (context, continuation), (logprob, _) in zip(requests, answers):
        assert logprob == pytest.approx(naive_loglikelihood(model, tokenizer, context, continuation)[0], abs=1e-4)


def test_greedy_generation_equals_transformers_generate(tiny):
    model, tokenizer = tiny
    prompts = ["hello world", "the model weight layer token", "a"]
    outputs = Runner(model, tokenizer, batch_size=3).generate(
        [GenerationRequest(p, GenerationParams(max_new_tokens=10)) for p in prompts])
    for prompt, output in zip(prompts, outputs):
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert output == tokenizer.decode(generated[0, encoded.input_ids.shape[1]:], skip_special_tokens=True)


def test_stop_sequences_cut_the_output(tiny):
    model, tokenizer = tiny
    runner = Runner(model, tokenizer, batch_size=2)
    free = runner.generate([GenerationRequest("seven tree", GenerationParams(max_new_tokens=12))])[0]
    stop = next(char for char in free[1:] if char.isascii() and char.isprintable())
    cut = runner.generate([GenerationRequest("seven tree", GenerationParams(max_new_tokens=12, stop=(stop,)))])[0]
    assert cut == free[: free.index(stop)]


def test_sampling_is_deterministic_for_a_seed_whatever_the_batch(tiny):
    model, tokenizer = tiny
    params = GenerationParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50)
    requests = [GenerationRequest(p, params, sample=s) for p in ("hello", "the model layer") for s in range(3)]
    first = Runner(model, tokenizer, batch_size=6, seed=1).generate(requests)
    again = Runner(model, tokenizer, batch_size=1, seed=1).generate(requests[::-1])[::-1]
    other_seed = Runner(model, tokenizer, batch_size=6, seed=2).generate(requests)
    assert first == again
    assert len(set(first)) > 1  # samples differ from each other
    assert first != other_seed


def test_chat_template_is_applied_when_asked(tiny):
    model, tokenizer = tiny
    runner = Runner(model, tokenizer)
    request = GenerationRequest("hi there", GenerationParams(chat=True, system="be brief"))
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}],
        add_generation_prompt=True, tokenize=False)
    assert expected.endswith("<|assistant|>\n")
    ids = tokenizer.encode(expected, add_special_tokens=False)
    assert runner.prompt_ids(request) == ids
    params = GenerationParams(max_new_tokens=8, chat=True, system="be brief")
    [output] = runner.generate([GenerationRequest("hi there", params)])
    with torch.no_grad():
        generated = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                   max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output == tokenizer.decode(generated[0, len(ids):], skip_special_tokens=True)


def test_chat_without_a_template_is_an_error(tiny):
    model, tokenizer = tiny
    template = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(InputError, match="chat template"):
            Runner(model, tokenizer).generate([GenerationRequest("hi", GenerationParams(chat=True))])
    finally:
        tokenizer.chat_template = template


@pytest.mark.parametrize("family", ["gemma2", "gpt2", "qwen3"])
def test_other_architectures_batched_with_long_contexts(family, tmp_path):
    """Gemma-2's sliding-window cache, GPT-2's learned positions: batched answers equal plain forwards."""
    from mergelab.evaluate import load_model
    from mergelab.zoo.random_models import make_model

    model, tokenizer = load_model(make_model(tmp_path / family, family, hidden=32, layers=2, intermediate=64,
                                             heads=4, kv_heads=2, vocab=320))
    requests = REQUESTS + [("x y z " * 30, " tree seven layer"), ("model", " A"), ("model", " B")]  # 90 tokens > window 64
    answers = Runner(model, tokenizer, batch_size=4).loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(requests, answers):
        expected, expected_greedy = naive_loglikelihood(model, tokenizer, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
    prompts = ["x y z " * 25, "a"]
    outputs = Runner(model, tokenizer, batch_size=2).generate(
        [GenerationRequest(p, GenerationParams(max_new_tokens=5)) for p in prompts])
    for prompt, output in zip(prompts, outputs):
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert output == tokenizer.decode(generated[0, encoded.input_ids.shape[1]:], skip_special_tokens=True)


def test_truncated_contexts_batched_with_learned_positions(tmp_path, caplog):
    """Contexts past GPT-2's 256 positions are cut per request, so tails of different lengths share a
    batch: their padding must not ask for positions the model has no embedding for. The cut is said once."""
    from mergelab.evaluate import load_model
    from mergelab.zoo.random_models import make_model

    model, tokenizer = load_model(make_model(tmp_path / "gpt2", "gpt2", hidden=32, layers=2, intermediate=64,
                                             heads=4, kv_heads=2, vocab=320))
    long = "x y z " * 100  # 300 tokens
    requests = [(long, " tree seven layer"), (long, " a"), (long, " model weight layer token tree seven"),
                ("w v " * 200, " b c")]
    with caplog.at_level("WARNING", logger="mergelab.evaluate.runner"):
        one_by_one = Runner(model, tokenizer, batch_size=1).loglikelihood(requests)
    cut = [r.getMessage() for r in caplog.records if "cut on the left" in r.getMessage()]
    assert cut == ["4 of 4 contexts were longer than the model's context of 256 tokens and were cut on the left "
                   "(as lm-eval does); few-shot examples or long prompts may have been lost"]
    batched = Runner(model, tokenizer, batch_size=4).loglikelihood(requests)
    for (logprob, greedy), (expected, expected_greedy) in zip(batched, one_by_one):
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy


def test_a_request_asked_twice_is_scored_once_and_answered_alike(tiny):
    """Two equal options (or one question twice) share a cache key: adding a tail twice would double it."""
    model, tokenizer = tiny
    requests = REQUESTS + [REQUESTS[0], REQUESTS[4], REQUESTS[4]]
    runner = Runner(model, tokenizer, batch_size=16)
    answers = runner.loglikelihood(requests)
    assert runner.stats.computed == len(REQUESTS)
    for (context, continuation), (logprob, greedy) in zip(requests, answers):
        expected, expected_greedy = naive_loglikelihood(model, tokenizer, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy


def test_completions_keep_their_leading_spaces_with_a_llama2_style_tokenizer(llama2_tokenizer, scripted_model):
    """Metaspace decoders strip the first space of a decoded sequence: the completion is decode(prompt + new) - decode(prompt)."""
    prompt = 'def add(a, b):\n    """Add two numbers."""\n'
    completion = "    return a + b\n\ndef other():\n    pass\n"
    model = scripted_model(llama2_tokenizer, prompt, completion)
    params = GenerationParams(max_new_tokens=100, stop=("\ndef",))
    [output] = Runner(model, llama2_tokenizer).generate([GenerationRequest(prompt, params)])
    assert output == "    return a + b\n"  # four spaces, and cut at the stop string found in the same text
    [free] = Runner(model, llama2_tokenizer).generate([GenerationRequest(prompt, GenerationParams(max_new_tokens=100))])
    assert free == completion


def test_rows_that_finish_at_different_steps_equal_transformers_generate(tiny):
    """Rows leave the batch at EOS or their own max_new_tokens; the others go on exactly as if alone."""
    model, tokenizer = tiny
    prompts = ["hello world", "the model weight layer token", "a", "seven tree three"]
    lengths = [9, 12, 6, 2]
    encoded = tokenizer("a", return_tensors="pt")
    with torch.no_grad():
        free = model.generate(**encoded, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    early_eos = int(free[0, encoded.input_ids.shape[1] + 2])  # the third token "a" produces ends its row
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, early_eos]
    try:
        outputs = Runner(model, tokenizer, batch_size=4).generate(
            [GenerationRequest(p, GenerationParams(max_new_tokens=n)) for p, n in zip(prompts, lengths)])
        steps = set()
        for prompt, length, output in zip(prompts, lengths, outputs):
            encoded = tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                generated = model.generate(**encoded, max_new_tokens=length, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id)[0, encoded.input_ids.shape[1]:].tolist()
            ends = [i for i, token in enumerate(generated) if token in (tokenizer.eos_token_id, early_eos)]
            generated = generated[: ends[0]] if ends else generated
            steps.add(len(generated))
            assert output == tokenizer.decode(generated, skip_special_tokens=True)
    finally:
        model.generation_config.eos_token_id = original
    assert len(steps) >= 3  # the rows really did finish at different steps


def test_an_empty_prompt_is_conditioned_on_the_prefix_token(tiny):
    """As lm-eval: BOS, else EOS; never a zero-length row."""
    import copy

    model, tokenizer = tiny
    assert tokenizer.encode("") == []  # this tokenizer adds no BOS by itself
    runner = Runner(model, tokenizer)
    [output] = runner.generate([GenerationRequest("", GenerationParams(max_new_tokens=5))])
    with torch.no_grad():
        expected = model.generate(torch.tensor([[tokenizer.bos_token_id]]), max_new_tokens=5, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[0, 1:]
    assert output == tokenizer.decode(expected, skip_special_tokens=True)
    no_bos = copy.deepcopy(tokenizer)
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    runner = Runner(model, no_bos)
    assert runner.prompt_ids(GenerationRequest("")) == [tokenizer.eos_token_id]
    assert runner.encode_pair("", "hello")[0] == [tokenizer.eos_token_id]


def test_a_context_of_spaces_only_is_scored_after_the_prefix_token(tiny):
    """Its spaces move to the continuation (lm-eval's rule), which leaves no context: BOS stands in, no empty row."""
    model, tokenizer = tiny
    requests = [(" ", "hello world"), ("   ", " model"), ("", "  hello world"), ("a b", " c")]
    answers = Runner(model, tokenizer, batch_size=4).loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(requests, answers):
        if context.strip():
            expected = naive_loglikelihood(model, tokenizer, context, continuation)
        else:  # the same as an empty context with the spaces in front of the continuation
            expected = naive_loglikelihood(model, tokenizer, "", context + continuation)
        assert (logprob, greedy) == (pytest.approx(expected[0], abs=1e-4), expected[1])


class OlderTransformersHead(torch.nn.Module):
    """A causal LM head written as transformers < 5 wrote it: ``hidden[:, slice, :]``, no boolean-mask logits_to_keep."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=0):
        from types import SimpleNamespace

        output = self.inner.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache)
        indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.inner.lm_head(output.last_hidden_state[:, indices, :])
        return SimpleNamespace(logits=logits, past_key_values=output.past_key_values)


def test_models_without_mask_logits_to_keep_get_full_logits(tiny):
    model, tokenizer = tiny
    older = OlderTransformersHead(model)
    answers = Runner(older, tokenizer, batch_size=4).loglikelihood(REQUESTS)
    for (context, continuation), (logprob, greedy) in zip(REQUESTS, answers):
        expected, expected_greedy = naive_loglikelihood(model, tokenizer, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
    outputs = Runner(older, tokenizer, batch_size=2).generate(
        [GenerationRequest(p, GenerationParams(max_new_tokens=4)) for p in ("hello", "the model layer")])
    assert outputs == Runner(model, tokenizer, batch_size=2).generate(
        [GenerationRequest(p, GenerationParams(max_new_tokens=4)) for p in ("hello", "the model layer")])


def test_cached_answers_are_keyed_by_device(tiny, tmp_path):
    from mergelab.evaluate import ResultCache

    model, tokenizer = tiny
    cache = ResultCache(tmp_path / "cache")
    Runner(model, tokenizer, cache=cache, fingerprint="same-weights").loglikelihood(REQUESTS[:2])
    again = Runner(model, tokenizer, cache=cache, fingerprint="same-weights")
    again.loglikelihood(REQUESTS[:2])
    assert again.stats.cached == 2

    def load_on_the_gpu():
        raise RuntimeError("the cpu answers were not reused: the model would be loaded")

    gpu = Runner(provider=load_on_the_gpu, cache=cache, fingerprint="same-weights", device="cuda", max_length=256)
    with pytest.raises(RuntimeError, match="would be loaded"):
        gpu.loglikelihood(REQUESTS[:2])


def test_generation_parameters_are_validated():
    from mergelab.errors import ConfigError

    with pytest.raises(ConfigError, match="top_k must be >= 0"):
        GenerationParams(top_k=-1)


def test_kv_caches_of_every_transformers_layout_give_up_rows_without_changing_the_original():
    from mergelab.evaluate.runner import _select_cache

    class ListCache:
        """DynamicCache as transformers 4.4x-4.5x kept it: key_cache / value_cache lists."""

        def __init__(self):
            self.key_cache = [torch.arange(6.0).reshape(3, 2)]
            self.value_cache = [torch.arange(6.0).reshape(3, 2) + 10]

        def batch_select_indices(self, indices):
            for layer in range(len(self.key_cache)):
                self.key_cache[layer] = self.key_cache[layer][indices, ...]
                self.value_cache[layer] = self.value_cache[layer][indices, ...]

    rows = torch.tensor([2, 0])
    old = ListCache()
    selected = _select_cache(old, rows)
    assert selected.key_cache[0].tolist() == [[4.0, 5.0], [0.0, 1.0]]
    assert selected.value_cache[0].tolist() == [[14.0, 15.0], [10.0, 11.0]]
    assert old.key_cache[0].shape[0] == 3  # the original still serves every row
    legacy = ((torch.arange(3.0), torch.arange(3.0) + 5),)
    assert [t.tolist() for t in _select_cache(legacy, rows)[0]] == [[2.0, 0.0], [7.0, 5.0]]
    with pytest.raises(InputError, match="cannot select rows"):
        _select_cache(object(), rows)
