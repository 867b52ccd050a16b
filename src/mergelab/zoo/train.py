"""Training the zoo's models: a plain, deterministic PyTorch loop on CPU.

Examples are (prompt ids, answer ids) pairs; the loss covers only the answer tokens (the
prompt is context). Batches are drawn with a seeded ``random.Random``, the optimiser is
AdamW with linear warm-up and linear decay, and gradients are clipped at 1. Training runs
on one CPU thread: for models this small, threads spend more time waiting on each other
than computing (and on a busy machine far more), so the zoo trains several models in
parallel processes instead. With the same seed and data the weights are identical.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

Example = tuple[list[int], list[int]]
# draw(rng, size) -> a batch of examples
BatchSampler = Callable[[random.Random, int], list[Example]]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    """Sizes of a zoo Llama."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 128

    def config(self, vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> Any:
        import transformers

        return transformers.LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.max_positions,
            tie_word_embeddings=False,
            pad_token_id=pad_id,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
        )


@dataclass(frozen=True)
class Schedule:
    steps: int
    lr: float
    batch_size: int = 64
    warmup: int = 20
    pack: int = 0  # > 0: concatenate each batch's examples into rows of this many tokens


def new_model(architecture: Architecture, tokenizer: Any, seed: int) -> Any:
    import torch
    import transformers

    config = architecture.config(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                                 tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def batch_tensors(examples: Sequence[Example], pad_id: int) -> tuple[Any, Any]:
    """Right-padded input ids and labels (-100 on prompt and padding)."""
    import torch

    length = max(len(p) + len(a) for p, a in examples)
    inputs = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(examples):
        sequence = prompt + answer
        inputs[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, len(prompt) : len(sequence)] = torch.tensor(answer)
    return inputs, labels


def packed_tensors(examples: Sequence[Example], row_length: int, pad_id: int) -> dict[str, Any]:
    """Examples concatenated into rows of at most ``row_length`` tokens, kept independent.

    Each example restarts its positions and attends only to itself (a block-diagonal
    causal mask), so training on packed rows equals training on the examples one by one,
    without spending compute on padding. Labels are -100 on prompts and padding.
    """
    import torch

    rows: list[list[Example]] = [[]]
    used = 0
    for example in examples:
        size = len(example[0]) + len(example[1])
        if rows[-1] and used + size > row_length:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += size
    length = max(sum(len(p) + len(a) for p, a in row) for row in rows)
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    segments = torch.full((len(rows), length), -1, dtype=torch.long)
    for index, row in enumerate(rows):
        start = 0
        for segment, (prompt, answer) in enumerate(row):
            end = start + len(prompt) + len(answer)
            inputs[index, start:end] = torch.tensor(prompt + answer)
            labels[index, start + len(prompt) : end] = torch.tensor(answer)
            positions[index, start:end] = torch.arange(end - start)
            segments[index, start:end] = segment
            start = end
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    same = segments[:, :, None] == segments[:, None, :]
    mask = (same & causal)[:, None]
    mask |= torch.eye(length, dtype=torch.bool)  # padding attends to itself only (its loss is ignored)
    return {"input_ids": inputs, "labels": labels, "position_ids": positions, "attention_mask": mask}


def train(
    model: Any,
    draw: BatchSampler,
    schedule: Schedule,
    seed: int,
    pad_id: int,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> float:
    """Train ``model`` in place on batches drawn by ``draw(rng, batch_size)``; return the last loss."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=schedule.lr, weight_decay=0.0)

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / schedule.warmup) * max(0.02, 1.0 - step / schedule.steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    loss_value = float("nan")
    for step in range(schedule.steps):
        examples = draw(rng, schedule.batch_size)
        if schedule.pack:
            batch = packed_tensors(examples, schedule.pack, pad_id)
        else:
            inputs, labels = batch_tensors(examples, pad_id)
            batch = {"input_ids": inputs, "labels": labels}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        if on_step is not None:
            on_step(step, loss_value)
    model.eval()
    return loss_value


def from_list(examples: Sequence[Example]) -> BatchSampler:
    """Batches of examples drawn uniformly with replacement."""
    return lambda rng, size: [examples[rng.randrange(len(examples))] for _ in range(size)]


def mixture(pools: Sequence[tuple[float, BatchSampler]]) -> BatchSampler:
    """Each example of a batch comes from a pool chosen with the given probabilities.

    (Mixing within batches matters: batches drawn whole from one task at a time train
    these small models much worse.)
    """
    total = sum(weight for weight, _ in pools)

    def draw(rng: random.Random, size: int) -> list[Example]:
        batch = []
        for _ in range(size):
            pick = rng.random() * total
            for weight, pool in pools:
                if pick < weight:
                    break
                pick -= weight
            batch.extend(pool(rng, 1))
        return batch

    return draw


def add_lora(model: Any, rank: int, alpha: int) -> Any:
    """Wrap ``model`` with a fresh PEFT LoRA adapter on every attention and MLP projection."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)
