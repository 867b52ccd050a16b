"""Helpers for the LoRA tests: build adapters with PEFT, and read PEFT's view of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergelab.zoo.random_models import make_model

ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = dict(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2)


def make_adapter(base: Path, path: Path, seed: int, saved_noise: float = 0.0, **config: Any) -> Path:
    """Save a PEFT LoRA adapter of ``base`` with random (non-zero) A and B factors.

    ``saved_noise`` > 0 also moves the ``modules_to_save`` copies away from the base (by
    Gaussian noise of that standard deviation), as training them would.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    config.setdefault("target_modules", ATTENTION_AND_MLP)
    config.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(model, LoraConfig(**config))
    with torch.no_grad():  # PEFT's own random init is large; keep ΔW comparable to W
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.2)
            elif "modules_to_save" in name and saved_noise:
                parameter.add_(torch.randn_like(parameter) * saved_noise)
    peft_model.save_pretrained(str(path))
    return path


class LoraSet:
    """A base model and adapters of it with every configuration the issue names."""

    def __init__(self, root: Path):
        self.root = root
        self.base = make_model(root / "base", "llama", seed=0, **SIZES)
        base = self.base
        self.plain = make_adapter(base, root / "plain", 1, r=4, lora_alpha=8)
        self.rslora = make_adapter(base, root / "rslora", 2, r=8, lora_alpha=16, use_rslora=True)
        self.patterned = make_adapter(
            base, root / "patterned", 3, r=6, lora_alpha=12,
            rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 3}, alpha_pattern={"o_proj": 3},
        )
        self.same_rank = make_adapter(base, root / "same_rank", 4, r=4, lora_alpha=4, use_rslora=True)
        self.embedding = make_adapter(base, root / "embedding", 5, r=4, lora_alpha=8,
                                      target_modules=ATTENTION_AND_MLP + ["embed_tokens"])
        self.extras = make_adapter(base, root / "extras", 6, r=4, lora_alpha=8, use_rslora=True,
                                   rank_pattern={"k_proj": 2}, target_modules=ATTENTION_AND_MLP + ["embed_tokens"],
                                   modules_to_save=["lm_head", "input_layernorm"])
        self.extras2 = make_adapter(base, root / "extras2", 7, r=2, lora_alpha=2, modules_to_save=["lm_head"])

    def path(self, name: str) -> str:
        return str(self.root / name)


def peft_model(base: str | Path, adapters: dict[str, str]):
    """A PeftModel of ``base`` with ``adapters`` (name -> path) loaded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(adapters)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), adapters[names[0]],
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model


def lora_layers(model) -> dict[str, Any]:
    """Base module name -> PEFT LoRA layer, for every LoRA layer of a PeftModel."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix): module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def peft_deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    """Module -> ΔW of ``adapter`` as PEFT computes it (get_delta_weight), for modules it has."""
    deltas = {}
    for name, layer in lora_layers(model).items():
        if adapter in layer.lora_A or adapter in getattr(layer, "lora_embedding_A", {}):
            deltas[name] = layer.get_delta_weight(adapter).detach()
    return deltas


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def lora_merge(recipe: dict[str, Any], out: Path, seed: int | None = 0):
    """Run ``mergelab lora merge`` on ``recipe`` (written beside ``out``); return the LoraResult."""
    import yaml

    from mergelab.lora.merge import run_lora_merge
    from mergelab.lora.output import LoraOptions

    config = out.parent / f"{out.name}.yml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run_lora_merge(config, out, LoraOptions(seed=seed, progress=False))


def weighted_sum(deltas: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Module -> Σ w_i ΔW_i over the adapters that have the module."""
    total: dict[str, torch.Tensor] = {}
    for found, weight in zip(deltas, weights):
        for name, delta in found.items():
            total[name] = total.get(name, torch.zeros_like(delta)) + weight * delta.double()
    return total
