"""Adapter algebra: merge LoRA adapters in ΔW space, bake them into a base, extract them from a fine-tune.

    merge:   adapters → ΔW per module → method → truncated SVD → PEFT adapter
    bake:    base + Σ w_i ΔW_i → full checkpoint
    extract: SVD of (fine-tune − base) → PEFT adapter

Each is a planner producing ``TensorTask``s for the streaming engine.
"""

from mergelab.lora.output import LoraOptions, LoraResult

__all__ = ["LoraOptions", "LoraResult"]
