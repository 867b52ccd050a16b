"""PEFT LoRA variants are refused by name, never read as plain LoRA; merged adapters get a plain config.

PEFT 0.21's LoraConfig has many switches that make an adapter something other than
W + scaling·B·A (DoRA, aLoRA, BD-LoRA, Arrow, ...), initialisations that rewrite the base
weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), and trainable tokens. Every one is refused
with its field name before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import load_model_tensors
from lora_support import make_adapter, peft_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.errors import InputError
from mergelab.io.adapter import (
    LORA_VARIANT_FIELDS,
    NEUTRAL_LORA_FIELDS,
    PLAIN_LORA_FIELDS,
    Adapter,
    check_plain_lora_config,
)
from mergelab.lora.bake import run_bake
from mergelab.lora.output import LoraOptions

# A value PEFT would take as "set" for each variant field (the variant's own sub-config where it has one).
SET_VALUES = {
    "use_dora": True,
    "alora_invocation_tokens": [5, 6],
    "use_bdlora": {"target_modules_bd_a": ["q_proj"], "target_modules_bd_b": ["o_proj"], "nblocks": 2},
    "arrow_config": {"top_k": 2},
    "velora_config": {"num_groups": 4},
    "monteclora_config": {"num_samples": 4},
    "kasa_config": {"beta": 0.0001},
    "use_qalora": True,
    "layer_replication": [[0, 2], [1, 2]],
    "target_parameters": ["mlp.experts.down_proj"],
    "trainable_token_indices": [1, 2, 3],
    "megatron_config": {"tensor_model_parallel_size": 2},
}


def test_every_peft_lora_config_field_is_sorted():
    """Each field of the installed PEFT's LoraConfig is plain, neutral or a refused variant; a new one fails here."""
    from peft import LoraConfig

    fields = {item.name for item in dataclasses.fields(LoraConfig)}
    known = PLAIN_LORA_FIELDS | NEUTRAL_LORA_FIELDS | set(LORA_VARIANT_FIELDS)
    assert fields - known == set(), "sort these new PEFT fields in mergelab.io.adapter"
    assert known - fields == set(), "these fields are not PEFT's"
    assert not PLAIN_LORA_FIELDS & NEUTRAL_LORA_FIELDS and not (PLAIN_LORA_FIELDS | NEUTRAL_LORA_FIELDS) & set(
        LORA_VARIANT_FIELDS)
    # PEFT's own marker of a variant (a LoraVariant layer) is refused, whatever the field
    variants = {item.name for item in dataclasses.fields(LoraConfig) if item.metadata.get("is_lora_variant")}
    assert variants <= set(LORA_VARIANT_FIELDS)
    assert set(SET_VALUES) == set(LORA_VARIANT_FIELDS)


@pytest.fixture(scope="module")
def variant_copies(loras, tmp_path_factory) -> dict[str, str]:
    """The plain adapter with one variant field set in its config, per field."""
    root = tmp_path_factory.mktemp("variants")
    made = {}
    for field, value in SET_VALUES.items():
        path = Path(shutil.copytree(loras.path("plain"), root / field))
        config = json.loads((path / "adapter_config.json").read_text())
        config[field] = value
        (path / "adapter_config.json").write_text(json.dumps(config))
        made[field] = str(path)
    return made


def assert_bake_refused(loras, adapter: str, out: Path, *message: str) -> str:
    result = CliRunner().invoke(app, ["lora", "bake", str(loras.base), adapter, str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    output = " ".join(result.output.split())
    for part in message:
        assert part in output, output
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return output


@pytest.mark.parametrize("field", sorted(SET_VALUES))
def test_lora_bake_refuses_every_variant_by_name(loras, variant_copies, tmp_path, field):
    assert_bake_refused(loras, variant_copies[field], tmp_path / "out", f"{field} is set", "adapter_config.json",
                        LORA_VARIANT_FIELDS[field], "mergelab reads plain LoRA adapters only")  # names it, says why


@pytest.mark.parametrize("field", ["use_dora", "alora_invocation_tokens", "use_bdlora"])
def test_lora_merge_refuses_variants_by_name(loras, variant_copies, tmp_path, field):
    import yaml

    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"adapters": [{"adapter": loras.path("plain")}, {"adapter": variant_copies[field]}],
                                      "merge_method": "linear", "parameters": {"weight": 1.0}}))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["lora", "merge", str(recipe), str(out)])
    assert result.exit_code == 2 and f"{field} is set" in result.output, result.output
    assert not out.exists()


def test_an_alora_adapter_saved_by_peft_is_refused_as_peft_refuses_to_merge_it(loras, tmp_path):
    alora = make_adapter(loras.base, tmp_path / "alora", 21, r=4, lora_alpha=8, task_type="CAUSAL_LM",
                         alora_invocation_tokens=[5, 6])
    with pytest.raises(NotImplementedError, match="aLoRA"):
        peft_model(loras.base, {"x": str(alora)}).merge_and_unload()
    assert_bake_refused(loras, str(alora), tmp_path / "out", "alora_invocation_tokens is set ([5, 6])",
                        "cannot be merged into the weights")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_initialisations_that_rewrote_the_base_are_refused(init):
    with pytest.raises(InputError, match=f"init_lora_weights is '{init}'.*path_initial_model_for_weight_conversion"):
        check_plain_lora_config({"peft_type": "LORA", "r": 4, "init_lora_weights": init}, "x/adapter_config.json")


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_initialisations_that_leave_the_base_alone_are_plain_lora(init):
    check_plain_lora_config({"peft_type": "LORA", "r": 4, "init_lora_weights": init}, "x/adapter_config.json")


def test_a_mica_adapter_bakes_exactly_as_peft_merges_it(loras, tmp_path):
    """MiCA only freezes B while training; PEFT merges it as plain LoRA, and so do we."""
    mica = make_adapter(loras.base, tmp_path / "mica", 22, r=4, lora_alpha=8, init_lora_weights="mica")
    assert json.loads((mica / "adapter_config.json").read_text())["init_lora_weights"] == "mica"
    result = run_bake(str(loras.base), [str(mica)], tmp_path / "baked", options=LoraOptions(progress=False))
    ours = load_model_tensors(result.out_dir)
    merged = peft_model(loras.base, {"x": str(mica)}).merge_and_unload().state_dict()
    for name, tensor in merged.items():
        assert torch.equal(ours[name], tensor), name


def test_unknown_fields_are_refused_when_set(loras, tmp_path):
    """A field this PEFT does not have may be a newer PEFT's variant: refused when set, ignored when empty."""
    path = Path(shutil.copytree(loras.path("plain"), tmp_path / "newer"))
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "use_future_lora": None, "old_switch": False}))
    Adapter(str(path))
    (path / "adapter_config.json").write_text(json.dumps({**config, "use_future_lora": {"k": 1}}))
    with pytest.raises(InputError, match=r"field 'use_future_lora' \(\{\"k\": 1\}\) is not a LoRA field mergelab knows"):
        Adapter(str(path))


def test_trainable_tokens_are_refused_by_config_and_by_tensor_name(loras, tmp_path):
    tokens = make_adapter(loras.base, tmp_path / "tokens", 23, r=4, lora_alpha=8, trainable_token_indices=[1, 2, 3])
    tensor = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    assert tensor in load_file(str(tokens / "adapter_model.safetensors"))
    assert_bake_refused(loras, str(tokens), tmp_path / "out", "trainable_token_indices is set ([1, 2, 3])")
    # without the config field, the tensor itself is recognised (not taken for a module of another architecture)
    config = json.loads((tokens / "adapter_config.json").read_text())
    (tokens / "adapter_config.json").write_text(json.dumps({**config, "trainable_token_indices": None}))
    output = assert_bake_refused(loras, str(tokens), tmp_path / "out", tensor, "holds trainable tokens")
    assert "different architecture" not in output


def test_merged_config_holds_plain_lora_fields_only(loras, tmp_path):
    """The first adapter's config is no template: neither its variant-free extras nor its init travel on."""
    from lora_support import lora_merge

    first = Path(shutil.copytree(loras.path("plain"), tmp_path / "first"))
    config = json.loads((first / "adapter_config.json").read_text())
    config.update({"init_lora_weights": "gaussian", "lora_dropout": 0.3, "eva_config": {"rho": 2.0},
                   "revision": "abc", "alora_invocation_tokens": None, "bias": "lora_only"})
    (first / "adapter_config.json").write_text(json.dumps(config))
    recipe = {"adapters": [{"adapter": str(first)}, {"adapter": loras.path("patterned")}], "merge_method": "linear",
              "parameters": {"weight": 1.0}}
    out = tmp_path / "merged"
    lora_merge(recipe, out)
    merged = json.loads((out / "adapter_config.json").read_text())
    assert set(merged) <= PLAIN_LORA_FIELDS | NEUTRAL_LORA_FIELDS
    check_plain_lora_config(merged, "merged")
    assert merged["init_lora_weights"] is True and merged["lora_dropout"] == 0.0 and merged["bias"] == "none"
    assert "eva_config" not in merged and "revision" not in merged
    assert merged["auto_mapping"] == config["auto_mapping"] and merged["task_type"] == "CAUSAL_LM"
    peft_model(loras.base, {"ours": str(out)})  # and PEFT loads it


def test_plain_adapter_merged_after_a_variant_would_not_inherit_it(loras, tmp_path):
    """The config writer itself never passes a variant field on, whatever the template holds."""
    from mergelab.io.adapter import adapter_config

    template = {**json.loads(Path(loras.path("plain"), "adapter_config.json").read_text()), **SET_VALUES}
    config = adapter_config(ranks={"model.layers.0.self_attn.q_proj": 4}, target_modules=["q_proj"], template=template)
    assert not set(config) & set(LORA_VARIANT_FIELDS)
    check_plain_lora_config(config, "merged")
