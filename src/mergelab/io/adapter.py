"""PEFT LoRA adapter directories: read them and write them.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
whose tensors are named ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``
(``lora_embedding_A`` / ``lora_embedding_B`` for embeddings). For one module

    ΔW = scaling · B·A,   scaling = alpha / r   (alpha / √r with ``use_rslora``)

where r and alpha come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches
the module (PEFT's rule: the first pattern p with ``(.*\\.)?(p)$`` matching the module
name), else from ``r`` / ``lora_alpha``. ΔW is laid out like the module's weight: it is
(B·A)ᵀ for embeddings (A is [r, vocab], B is [dim, r]) and for ``fan_in_fan_out`` layers
(GPT-2's Conv1D stores [in, out]).

Other tensors are full copies that replace the base's: ``modules_to_save`` modules
(``base_model.model.lm_head.weight``) and base layers PEFT saved beside a LoRA module
(``...embed_tokens.base_layer.weight``).

Applying adapters to a base (``BASE+ADAPTER``, ``lora bake``) is ``mergelab.lora.adapted``'s
work: it needs the base's architecture (how it stores Conv1D weights, whether it ties its
embeddings), which this package does not know.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mergelab.errors import InputError
from mergelab.io.checkpoint import (
    PICKLE_SUFFIXES,
    TensorInfo,
    read_safetensors_header,
    read_tensor,
    resolve_model_dir,
)

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# What PEFT saves for trainable_token_indices: the new rows of the listed token ids, not a whole tensor.
TRAINABLE_TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"

# tensor-name suffix -> (kind of module, which factor)
_LORA_SUFFIXES = (
    (".lora_A.weight", "linear", "A"),
    (".lora_B.weight", "linear", "B"),
    (".lora_B.bias", "linear", "bias"),
    (".lora_embedding_A", "embedding", "A"),
    (".lora_embedding_B", "embedding", "B"),
)

# Every field of PEFT 0.21's ``LoraConfig``, sorted by what it means for ΔW = scaling · B·A.
# tests/lora/test_lora_variants.py checks this against the installed PEFT, so a field a newer PEFT adds
# fails that test until it is sorted here.
#
# Read and honoured: they decide which modules change and how (see the module docstring).
PLAIN_LORA_FIELDS = frozenset({
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "lora_bias",
    "bias",  # which biases were trained; the trained ones are saved as full tensors and applied as such
})
# Bookkeeping, or used only while training or initialising: the saved factors already hold their effect.
# (init_lora_weights is checked on its own: some initialisations rewrite the base weights.)
NEUTRAL_LORA_FIELDS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "init_lora_weights", "runtime_config", "megatron_core",
    "qalora_group_size",  # only read with use_qalora, which is refused
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",  # settings of an init_lora_weights scheme
    "ensure_weight_tying",  # ties adapters of tied modules; what it tied is in the saved tensors
})
# Settings that make an adapter something other than W + scaling · B·A: refused when set (PEFT's own test
# for a variant is the field's truth value), with the reason.
LORA_VARIANT_FIELDS: dict[str, str] = {
    "use_dora": "DoRA adapters rescale each column of the weight by a learned magnitude vector, so the update is "
                "not scaling · B·A",
    "alora_invocation_tokens": "aLoRA (activated LoRA) adapters change only the tokens after their invocation "
                               "sequence, so they cannot be merged into the weights (PEFT's merge_and_unload "
                               "refuses them too)",
    "use_bdlora": "BD-LoRA adapters store block-diagonal factors in blocks, not as the A and B matrices of plain LoRA",
    "arrow_config": "Arrow adapters route every token among several LoRA experts, which cannot be merged into the "
                    "weights (PEFT refuses to merge them too)",
    "velora_config": "VeLoRA adapters are a PEFT LoRA variant with extra per-module state (lora_velora_*) that "
                     "mergelab does not read",
    "monteclora_config": "MonteCLoRA adapters are a PEFT LoRA variant with a trained sampler "
                         "(lora_monteclora_sampler) beside A and B that mergelab does not read",
    "kasa_config": "KaSA adapters truncate the base weight's smallest singular values and scale B·A by a learned "
                   "diagonal, so the update is not scaling · B·A on the original base",
    "use_qalora": "QA-LoRA adapters pool their inputs in groups and are meant for a quantized base",
    "layer_replication": "layer_replication changes the model's layer structure",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters) is not plain module LoRA",
    "trainable_token_indices": "trainable tokens replace rows of the embedding "
                               "(token_adapter.trainable_tokens_delta), which mergelab does not apply",
    "megatron_config": "the adapter was built for Megatron's parallel linear layers, not a Hugging Face checkpoint",
}
# init_lora_weights values whose initialisation rewrote the base weights (W − scaling·B₀A₀, or a quantized
# residual): the saved factors belong to that rewritten base, not to base_model_name_or_path. PEFT's
# save_pretrained(..., path_initial_model_for_weight_conversion=...) converts them to plain LoRA (and
# records init_lora_weights=True).
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def refuse_repeated(adapters: Sequence["Adapter"], advice: str) -> None:
    """Refuse an adapter directory given twice (by any spelling of its path); ``advice`` says what to do."""
    seen: dict[Path, Adapter] = {}
    for adapter in adapters:
        first = seen.setdefault(adapter.path.resolve(), adapter)
        if first is not adapter:
            also = "" if first.reference == adapter.reference else f" (as '{first.reference}' too)"
            raise InputError(f"adapter '{adapter.reference}' is given twice{also}; {advice}")


def check_plain_lora_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse an ``adapter_config.json`` that is not plain LoRA, naming the field and why.

    Every LoRA variant field of PEFT 0.21 that is set (truthy, as PEFT tests it), an
    initialisation that rewrote the base weights, and any set field this PEFT version
    does not have (a newer PEFT's variant would otherwise be read as plain LoRA).
    """
    for key, value in config.items():
        if key in LORA_VARIANT_FIELDS:
            if value:
                raise InputError(
                    f"{where}: {key} is set ({_short(value)}); {LORA_VARIANT_FIELDS[key]}. mergelab reads plain LoRA "
                    f"adapters only: use this adapter with PEFT itself, or train it again without {key}."
                )
        elif key == "init_lora_weights":
            if isinstance(value, str) and value.lower().startswith(_BASE_REWRITING_INITS):
                raise InputError(
                    f"{where}: init_lora_weights is '{value}', an initialisation that rewrote the base model's "
                    "weights, so these factors apply to that rewritten base, not to the original one. Convert the "
                    "adapter to plain LoRA with PEFT: save_pretrained(out, "
                    "path_initial_model_for_weight_conversion=<the adapter saved before training>)."
                )
        elif key not in PLAIN_LORA_FIELDS and key not in NEUTRAL_LORA_FIELDS and value not in (None, False, "", [], {}):
            raise InputError(
                f"{where}: field '{key}' ({_short(value)}) is not a LoRA field mergelab knows (those of PEFT 0.21's "
                "LoraConfig); it may be a newer PEFT's LoRA variant, which would be read wrongly as plain LoRA. "
                "Remove it from the file only if you know it does not change the weights."
            )


def _names(patterns: str | Sequence[str], module: str) -> bool:
    """Whether PEFT's ``target_modules`` / ``exclude_modules`` value names ``module``."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module) is not None
    return module in patterns or any(module.endswith(f".{name}") for name in patterns)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def lora_tensor_names(module: str, embedding: bool) -> tuple[str, str]:
    """PEFT's names for the A and B factors of ``module`` (a base module name)."""
    if embedding:
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def pattern_key(patterns: Sequence[str], module: str) -> str | None:
    """The first rank/alpha pattern that applies to ``module`` (PEFT's ``get_pattern_key``)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def lora_delta(a: Any, b: Any, scaling: float, transposed: bool) -> Any:
    """ΔW = scaling · B·A, laid out like the module's weight ((B·A)ᵀ when ``transposed``).

    The operations and their order are PEFT's ``get_delta_weight``, so float32 results are
    bit-identical to PEFT's.
    """
    product = b @ a
    if transposed:
        product = product.T
    return product * scaling


@dataclass(frozen=True)
class LoraModule:
    """One module an adapter changes: its factor tensors and its scaling."""

    name: str  # base module name, e.g. model.layers.0.self_attn.q_proj
    a: TensorInfo  # [r, in] (embedding: [r, vocab])
    b: TensorInfo  # [out, r] (embedding: [dim, r])
    rank: int
    alpha: float
    scaling: float
    embedding: bool
    fan_in_fan_out: bool
    bias: TensorInfo | None = None  # lora_B.bias (lora_bias adapters)

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def transposed(self) -> bool:
        """ΔW is (B·A)ᵀ: embeddings, and fan_in_fan_out (Conv1D) layers."""
        return self.embedding or self.fan_in_fan_out

    @property
    def factor_shape(self) -> tuple[int, int]:
        """Shape of B·A: [out, in] (embedding: [dim, vocab])."""
        return (self.b.shape[0], self.a.shape[1])

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of ΔW, the same as the module's weight in the base checkpoint."""
        rows, cols = self.factor_shape
        return (cols, rows) if self.transposed else (rows, cols)


class Adapter:
    """A PEFT LoRA adapter directory, read lazily (headers at open, factors on request).

    Validates the config against the tensors: every module has both factors, ranks agree
    with ``r`` / ``rank_pattern``, no rank is 0. Serves its raw tensors by name, like a
    ``Checkpoint`` (``get_tensor``, ``info``), so the engine can read it.
    """

    def __init__(self, reference: str | os.PathLike[str]):
        self.reference = str(reference)
        self.path = resolve_model_dir(self.reference, kind="adapter")
        if not self.path.is_dir():
            raise InputError(f"adapter '{self.reference}' is a file; give the adapter directory that holds {ADAPTER_CONFIG}.")
        config_path = self.path / ADAPTER_CONFIG
        if not config_path.is_file():
            raise InputError(
                f"{self.path}: no {ADAPTER_CONFIG}, so this is not a PEFT adapter directory "
                "(save adapters with PeftModel.save_pretrained)."
            )
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{config_path}: invalid JSON ({exc}).") from None
        if not isinstance(self.config, dict):
            raise InputError(f"{config_path}: expected a JSON object.")
        self.weights_path = self.path / ADAPTER_WEIGHTS
        if not self.weights_path.is_file():
            self._refuse_missing_weights()
        self._read_config(config_path)
        self.tensors: dict[str, TensorInfo] = read_safetensors_header(self.weights_path)
        self.modules: dict[str, LoraModule] = {}
        self.full_tensors: dict[str, str] = {}  # base tensor name -> adapter tensor name
        self._classify_tensors()
        self._fd: int | None = None
        self._lock = threading.Lock()

    # ---- reading the directory -----------------------------------------------------------
    def _refuse_missing_weights(self) -> None:
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise InputError(
                f"{self.path}: the adapter weights are a pickle file ({', '.join(pickles[:3])}), which mergelab "
                "refuses to load because unpickling can run arbitrary code. Convert it once, in an environment you "
                "trust: PeftModel.from_pretrained(base, path).save_pretrained(out, safe_serialization=True)."
            )
        raise InputError(f"{self.path}: {ADAPTER_WEIGHTS} is missing; the adapter directory is incomplete.")

    def _read_config(self, config_path: Path) -> None:
        config = self.config
        where = str(config_path)
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise InputError(f"{where}: peft_type is {peft_type}; mergelab reads LoRA adapters only.")
        check_plain_lora_config(config, where)
        self.r = _positive_int(config.get("r", 8), f"{where}: r")
        self.lora_alpha = _number(config.get("lora_alpha", 8), f"{where}: lora_alpha")
        self.use_rslora = bool(config.get("use_rslora", False))
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        self.lora_bias = bool(config.get("lora_bias", False))
        self.rank_pattern = _pattern(config.get("rank_pattern"), f"{where}: rank_pattern")
        self.alpha_pattern = _pattern(config.get("alpha_pattern"), f"{where}: alpha_pattern")
        for key, value in self.rank_pattern.items():
            _positive_int(value, f"{where}: rank_pattern['{key}']")
        for key, value in self.alpha_pattern.items():
            _number(value, f"{where}: alpha_pattern['{key}']")
        target = config.get("target_modules")
        if target is not None and not isinstance(target, (str, list)):
            raise InputError(f"{where}: target_modules must be a list of names or a regular expression.")
        self.target_modules: str | list[str] | None = target
        self.modules_to_save: list[str] = list(config.get("modules_to_save") or [])
        self.base_model_name_or_path: str | None = config.get("base_model_name_or_path")

    def _classify_tensors(self) -> None:
        factors: dict[tuple[str, str], dict[str, TensorInfo]] = {}
        where = str(self.weights_path)
        for name, info in self.tensors.items():
            if not name.startswith(PEFT_PREFIX):
                raise InputError(
                    f"{where}: tensor '{name}' does not start with '{PEFT_PREFIX}'; this is not a PEFT adapter "
                    "saved by PeftModel.save_pretrained."
                )
            for suffix, kind, part in _LORA_SUFFIXES:
                if name.endswith(suffix):
                    module = name[len(PEFT_PREFIX) : -len(suffix)]
                    factors.setdefault((module, kind), {})[part] = info
                    break
            else:
                if name.endswith(TRAINABLE_TOKENS_SUFFIX):
                    module = name[len(PEFT_PREFIX) : -len(TRAINABLE_TOKENS_SUFFIX)]
                    raise InputError(
                        f"{where}: tensor '{name}' holds trainable tokens (PEFT's trainable_token_indices: new rows "
                        f"for some token ids of '{module}'), which mergelab does not apply. Merge this adapter with "
                        "PEFT (PeftModel.merge_and_unload), or train it with the embedding in modules_to_save."
                    )
                if ".lora_" in name:
                    raise InputError(
                        f"{where}: tensor '{name}' is a LoRA tensor of a kind mergelab does not know (only lora_A, "
                        "lora_B, lora_embedding_A/B and lora_B.bias are plain LoRA)."
                    )
                base_name = name[len(PEFT_PREFIX) :].replace(".base_layer.", ".")
                self.full_tensors[base_name] = name
        for (module, kind), parts in sorted(factors.items()):
            if "A" not in parts or "B" not in parts:
                missing = "A" if "A" not in parts else "B"
                raise InputError(f"{where}: module '{module}' has no lora_{missing} tensor; the adapter file is incomplete.")
            if module in self.modules:
                raise InputError(f"{where}: module '{module}' has both linear and embedding LoRA tensors.")
            self.modules[module] = self._module(module, kind, parts)
        if not self.modules and not self.full_tensors:
            raise InputError(f"{where}: holds no LoRA tensors.")
        self._check_targets()

    def _check_targets(self) -> None:
        """Refuse LoRA weights for modules that ``target_modules`` (less ``exclude_modules``) does not name:
        PEFT creates LoRA layers for the named modules alone and would leave those weights out, so applying
        them would compute something else (a hand-edited config, or weights from another adapter). Matched
        as PEFT matches: a string is a regular expression for the whole name, a list holds names or their
        last parts. Not checked where the model decides (``all-linear``, ``layers_to_transform``). With
        ``ensure_weight_tying``, PEFT saves LoRA on a tied model's output head but names only its
        embeddings: a top-level module (the head, e.g. ``lm_head``) may then be unnamed."""
        config, target = self.config, self.target_modules
        if not target or (isinstance(target, str) and target.lower() == "all-linear") \
                or config.get("layers_to_transform") not in (None, [], ""):
            return
        excluded = config.get("exclude_modules") or []
        tied_head = bool(config.get("ensure_weight_tying"))
        stray = [module for module in self.modules
                 if (not _names(target, module) and not (tied_head and "." not in module))
                 or (excluded and _names(excluded, module))]
        if stray:
            raise InputError(
                f"{self.path / ADAPTER_CONFIG}: target_modules {_short(target)}"
                + (f" (less exclude_modules {_short(excluded)})" if excluded else "")
                + f" does not name {len(stray)} module(s) that {ADAPTER_WEIGHTS} has LoRA weights for (e.g. "
                f"'{stray[0]}'); PEFT would leave those weights out. Correct target_modules, or the weights."
            )

    def _module(self, module: str, kind: str, parts: dict[str, TensorInfo]) -> LoraModule:
        where = f"{self.weights_path}: module '{module}'"
        a, b = parts["A"], parts["B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise InputError(f"{where}: LoRA factors must be matrices (got {list(a.shape)} and {list(b.shape)}); "
                             "convolution LoRA is not supported.")
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise InputError(f"{where}: lora_A has {rank} rows but lora_B has {b.shape[1]} columns; they must agree.")
        if rank == 0:
            raise InputError(f"{where}: rank 0 (empty factors); remove the module or re-save the adapter.")
        if not (a.is_floating_point and b.is_floating_point):
            raise InputError(f"{where}: factors must be floating point (got {a.dtype}, {b.dtype}); quantized adapters "
                             "are not supported.")
        r_key = pattern_key(list(self.rank_pattern), module)
        alpha_key = pattern_key(list(self.alpha_pattern), module)
        r = int(self.rank_pattern[r_key]) if r_key is not None else self.r
        alpha = float(self.alpha_pattern[alpha_key]) if alpha_key is not None else self.lora_alpha
        if r != rank:
            source = f"rank_pattern['{r_key}']" if r_key is not None else "r"
            raise InputError(
                f"{where}: {ADAPTER_CONFIG} says rank {r} ({source}) but the factors have rank {rank}; "
                "the config does not belong to these weights."
            )
        scaling = alpha / math.sqrt(r) if self.use_rslora else alpha / r
        bias = parts.get("bias")
        if bias is not None and (len(bias.shape) != 1 or bias.shape[0] != b.shape[0]):
            raise InputError(f"{where}: lora_B.bias has shape {list(bias.shape)}, expected [{b.shape[0]}].")
        return LoraModule(
            name=module,
            a=a,
            b=b,
            rank=rank,
            alpha=alpha,
            scaling=scaling,
            embedding=kind == "embedding",
            fan_in_fan_out=self.fan_in_fan_out and kind == "linear",
            bias=bias,
        )

    # ---- facts -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.reference

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def factor_dtype(self) -> str:
        for module in self.modules.values():
            return module.a.dtype
        return "float32"

    def layer_prefixes(self) -> set[str]:
        """Where numbered blocks live in module names ('model.layers', 'transformer.h', ...)."""
        prefixes = set()
        for name in list(self.modules) + list(self.full_tensors):
            match = re.match(r"^(.*?)\.\d+\.", name)
            if match:
                prefixes.add(match.group(1))
        return prefixes

    def lay_out_like_base(self, stores_transposed: Callable[[str], bool], base_name: str) -> None:
        """Decide per linear module whether ΔW is (B·A)ᵀ from how the base stores that weight.

        ``stores_transposed(module)`` says whether the base keeps the module's weight as
        [in, out] (transformers' Conv1D). PEFT decides the same way when it loads an adapter:
        a Conv1D target gets ``fan_in_fan_out`` on and an ``nn.Linear`` gets it off, whatever
        ``adapter_config.json`` says (with a warning); so do we.
        """
        for name, module in self.modules.items():
            transposed = bool(stores_transposed(name))
            if module.embedding or transposed == module.fan_in_fan_out:
                continue
            log.warning(
                "adapter '%s': %s has fan_in_fan_out=%s, but base model '%s' stores the weight of '%s' as %s; "
                "reading it with fan_in_fan_out=%s, as PEFT does",
                self.reference, ADAPTER_CONFIG, module.fan_in_fan_out, base_name, name,
                "[in, out] (Conv1D)" if transposed else "[out, in] (Linear)", transposed,
            )
            self.modules[name] = replace(module, fan_in_fan_out=transposed)

    def check_base(self, base_tensors: Mapping[str, TensorInfo], base_name: str) -> None:
        """Every module and full tensor of this adapter must exist in the base with the same shape."""
        for module in self.modules.values():
            info = base_tensors.get(module.weight_name)
            if info is None:
                raise InputError(
                    f"adapter '{self.reference}' targets module '{module.name}', which base model '{base_name}' does "
                    f"not have (no tensor '{module.weight_name}'); the adapter was trained on a different architecture."
                )
            if tuple(info.shape) != module.weight_shape:
                raise InputError(
                    f"adapter '{self.reference}': module '{module.name}' expects a weight of shape "
                    f"{list(module.weight_shape)} but base model '{base_name}' has {list(info.shape)}; the adapter "
                    "was trained on a model of a different size."
                )
            if module.bias is not None and f"{module.name}.bias" not in base_tensors:
                raise InputError(
                    f"adapter '{self.reference}': module '{module.name}' has a LoRA bias (lora_bias) but base model "
                    f"'{base_name}' has no '{module.name}.bias'."
                )
        for base_name_of_tensor, adapter_name in self.full_tensors.items():
            info = base_tensors.get(base_name_of_tensor)
            saved = self.tensors[adapter_name]
            if info is None:
                raise InputError(
                    f"adapter '{self.reference}' saves a full copy of '{base_name_of_tensor}' (modules_to_save), which "
                    f"base model '{base_name}' does not have; the adapter was trained on a different architecture."
                )
            if tuple(info.shape) != tuple(saved.shape):
                raise InputError(
                    f"adapter '{self.reference}' saves '{base_name_of_tensor}' with shape {list(saved.shape)} but base "
                    f"model '{base_name}' has {list(info.shape)}; if the adapter was trained with a resized "
                    "vocabulary, resize the base model's embeddings first."
                )
        if isinstance(self.target_modules, list):
            module_names = {name.rsplit(".", 1)[0] for name in base_tensors}
            for target in self.target_modules:
                if target not in module_names and not any(m.endswith(f".{target}") for m in module_names):
                    log.warning(
                        "adapter '%s': target module '%s' in %s matches no module of base model '%s'",
                        self.reference, target, ADAPTER_CONFIG, base_name,
                    )

    # ---- data (a TensorSource of the raw adapter tensors) -------------------------------
    def __contains__(self, tensor_name: str) -> bool:
        return tensor_name in self.tensors

    def info(self, tensor_name: str) -> TensorInfo:
        try:
            return self.tensors[tensor_name]
        except KeyError:
            raise InputError(f"{self.weights_path}: has no tensor '{tensor_name}'.") from None

    def get_tensor(self, tensor_name: str) -> Any:
        info = self.info(tensor_name)
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.weights_path, os.O_RDONLY)
            fd = self._fd
        return read_tensor(fd, info, self.weights_path)

    def delta(self, module: str) -> Any:
        """ΔW of ``module`` (float32 or wider), laid out like the base weight."""
        import torch

        spec = self.modules[module]
        work = torch.promote_types(getattr(torch, spec.a.dtype), torch.float32)
        a = self.get_tensor(spec.a.name).to(work)
        b = self.get_tensor(spec.b.name).to(work)
        return lora_delta(a, b, spec.scaling, spec.transposed)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Adapter({self.reference!r}, {len(self.modules)} LoRA modules, {len(self.full_tensors)} full tensors)"


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise InputError(f"{where} must be a whole number, got {value!r}.")
    if value < 1:
        raise InputError(f"{where} is {value!r}; a LoRA rank must be at least 1.")
    return int(value)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{where} must be a finite number, got {value!r}.")
    return float(value)


def _pattern(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{where} must be a mapping from module pattern to value.")
    return value


# ---------------------------------------------------------------------------------------
# Applying adapters to base tensors: W' = W + Σ_i w_i ΔW_i
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateTerm:
    """One adapter's contribution to one base tensor, scaled by that adapter's weight w.

    kind ``lora``: w · scaling · (B·A)[ᵀ] (inputs A, B); ``bias``: w · scaling · b (input
    lora_B.bias); ``full``: the adapter's saved copy S (modules_to_save) contributes
    w · (S − W), so with w = 1 it replaces W, as PEFT's ``merge_and_unload`` does.
    """

    kind: str
    source: int  # index of the adapter
    tensors: tuple[str, ...]  # adapter tensor names this term reads, in order
    weight: float = 1.0
    scaling: float = 1.0
    transposed: bool = False

    def describe(self) -> str:
        if self.kind == "full":
            return f"{self.weight:g}·(S{self.source} − W)"
        factor = f"{self.weight:g}·{self.scaling:.4g}"
        product = "(B·A)ᵀ" if self.transposed else ("b" if self.kind == "bias" else "B·A")
        return f"{factor}·{product}[{self.source}]"


@dataclass(frozen=True)
class TensorUpdate:
    """Every adapter contribution to one base tensor, in adapter order."""

    terms: tuple[UpdateTerm, ...]

    @property
    def inputs(self) -> tuple[tuple[int, str], ...]:
        """(adapter index, tensor name) of every adapter tensor, in the order ``apply`` takes them."""
        return tuple((term.source, name) for term in self.terms for name in term.tensors)

    def apply(self, weight: Any, loaded: Sequence[Any]) -> Any:
        """W + Σ terms, in the working dtype of ``weight``.

        Full copies first (one copy with w = 1 replaces W exactly), then LoRA updates
        added one adapter at a time in adapter order, as PEFT merges them.
        """
        values = iter(loaded)
        per_term = [[next(values) for _ in term.tensors] for term in self.terms]
        full = [(term, tensors[0]) for term, tensors in zip(self.terms, per_term) if term.kind == "full"]
        if len(full) == 1 and full[0][0].weight == 1.0:
            result = full[0][1].to(weight.dtype).clone()
        else:
            result = weight.clone()
            for term, saved in full:
                result.add_(saved.to(weight.dtype) - weight, alpha=term.weight)
        for term, tensors in zip(self.terms, per_term):
            if term.kind == "lora":
                delta = lora_delta(tensors[0], tensors[1], term.scaling, term.transposed)
            elif term.kind == "bias":
                delta = tensors[0] * term.scaling
            else:
                continue
            if term.weight != 1.0:
                delta = delta * term.weight
            result += delta.to(weight.dtype)
        return result

    def describe(self) -> str:
        return "W + " + " + ".join(term.describe() for term in self.terms)


def plan_updates(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, TensorUpdate]:
    """Base tensor name -> the update the adapters make to it (tensors they leave alone are absent)."""
    terms: dict[str, list[UpdateTerm]] = {}
    for index, (adapter, weight) in enumerate(zip(adapters, weights)):
        for module in adapter.modules.values():
            terms.setdefault(module.weight_name, []).append(
                UpdateTerm("lora", index, (module.a.name, module.b.name), weight, module.scaling, module.transposed)
            )
            if module.bias is not None:
                terms.setdefault(f"{module.name}.bias", []).append(
                    UpdateTerm("bias", index, (module.bias.name,), weight, module.scaling)
                )
        for base_name, adapter_name in adapter.full_tensors.items():
            terms.setdefault(base_name, []).append(UpdateTerm("full", index, (adapter_name,), weight))
    return {name: TensorUpdate(tuple(found)) for name, found in terms.items()}


# ---------------------------------------------------------------------------------------
# Writing adapter directories
# ---------------------------------------------------------------------------------------


# What an input adapter's config passes on to a merged adapter's: what kind of model it is for. PEFT's
# add_weighted_adapter copies the first adapter's whole config; copying more than this would carry a variant
# switch (aLoRA's invocation tokens, DoRA, ...) or an init scheme onto factors that no longer have it.
_TEMPLATE_FIELDS = ("task_type", "auto_mapping")


def adapter_config(
    *,
    ranks: Mapping[str, int],
    target_modules: str | list[str],
    modules_to_save: Sequence[str] = (),
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = False,
    template: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A plain PEFT LoRA ``adapter_config.json`` for factors whose ΔW needs no scaling (scaling 1).

    ``ranks`` maps each module to its rank; r and lora_alpha are the most common rank,
    and modules with another rank get equal ``rank_pattern`` and ``alpha_pattern``
    entries (full module names, which match only themselves), so alpha / r = 1 everywhere.
    Every field is a plain-LoRA one (``PLAIN_LORA_FIELDS`` / ``NEUTRAL_LORA_FIELDS``);
    ``template`` (an input adapter's config) supplies only ``task_type`` and ``auto_mapping``.
    """
    if not ranks:
        raise ValueError("an adapter needs at least one module")
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    r = max(counts, key=lambda rank: (counts[rank], rank))
    pattern = {module: rank for module, rank in sorted(ranks.items()) if rank != r}
    config: dict[str, Any] = {"peft_type": "LORA", "task_type": "CAUSAL_LM"}
    if template:
        config.update({key: template[key] for key in _TEMPLATE_FIELDS if template.get(key) is not None})
    config.update(
        {
            "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path,
            "r": r,
            "lora_alpha": r,
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "use_rslora": False,
            "lora_bias": False,
            "bias": "none",
            "lora_dropout": 0.0,
            "init_lora_weights": True,
            "fan_in_fan_out": fan_in_fan_out,
            "target_modules": target_modules,
            "modules_to_save": list(modules_to_save) or None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "exclude_modules": None,
        }
    )
    return config


def write_adapter_config(directory: Path, config: Mapping[str, Any]) -> None:
    (Path(directory) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def exact_target_modules(modules: Sequence[str]) -> str:
    """A ``target_modules`` regular expression that matches exactly these module names."""
    return "^(" + "|".join(re.escape(name) for name in sorted(modules)) + ")$"
