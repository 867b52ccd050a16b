"""A base model with LoRA adapters applied: what ``BASE+ADAPTER`` means and what ``lora bake`` writes.

``AdaptedModel`` reads like a ``Checkpoint`` of the base and returns W + Σ_i w_i ΔW_i per
tensor, computed when a tensor is asked for. ``mergelab merge`` reads it for a model
reference ``BASE+ADAPTER[+ADAPTER...]`` (mergekit's syntax); ``lora bake`` plans its
streamed tasks from it. Both apply adapters as PEFT runs them, unmerged:

- a module the base stores as [in, out] (transformers' Conv1D) takes ΔW = (B·A)ᵀ, whatever
  ``fan_in_fan_out`` the adapter's config says (PEFT decides from the module too);
- a base that ties its output head to its input embeddings (``tie_word_embeddings``), with
  an adapter that changes one of the two (LoRA on ``embed_tokens`` or ``lm_head``, or either
  in ``modules_to_save``), is untied: the embeddings and the head each get their own
  update and the result has its own ``lm_head.weight`` and ``tie_word_embeddings: false``.
  The adapted model then computes what the PEFT model computes before merging. PEFT's
  ``merge_and_unload`` does the same for ``modules_to_save`` copies; for LoRA on a tied
  module it adds ΔW to the one shared matrix, changing the other role as well (PEFT issue
  #2777), which mergelab does not copy.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from mergelab.arch import (
    architecture,
    check_stored_head,
    embedding_name,
    head_names,
    parse_name,
    same_architecture,
    stores_transposed,
    ties_embeddings,
)
from mergelab.errors import InputError
from mergelab.io import Checkpoint, TensorInfo
from mergelab.io.adapter import Adapter, TensorUpdate, plan_updates, refuse_repeated

log = logging.getLogger(__name__)

DEFAULT_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Untied:
    """A tied base written untied: ``head`` starts from the base's ``embed`` matrix."""

    embed: str
    head: str


def tied_head(base: Checkpoint) -> Optional[Untied]:
    """For a base that ties its embeddings: its embedding tensor and the name its output head
    has when written on its own (None for an untied base)."""
    if not ties_embeddings(base.config, base.tensors):
        return None
    embed = embedding_name(base.tensors)
    if embed is None:
        return None
    check_stored_head(base)
    stored = [name for name in head_names(base.tensors) if name.endswith("weight")]
    return Untied(embed, stored[0] if stored else DEFAULT_HEAD)


def tensors_with_head(base: Checkpoint, tied: Optional[Untied]) -> dict[str, TensorInfo]:
    """The base's tensors as adapters address them: a tied base's head (``tied``, from :func:`tied_head`)
    is its embedding matrix (PEFT's ``lm_head`` module of a tied model holds that matrix)."""
    tensors = dict(base.tensors)
    if tied is not None:
        tensors[tied.head] = replace(base.tensors[tied.embed], name=tied.head)
    return tensors


def fit_to_base(adapters: Sequence[Adapter], base: Checkpoint, base_name: str) -> dict[str, TensorInfo]:
    """Lay the adapters out like ``base`` (Conv1D modules), check each against it (recorded architecture,
    modules and shapes) and return the base's tensors as the adapters address them."""
    addressable = tensors_with_head(base, tied_head(base))
    for adapter in adapters:
        adapter.lay_out_like_base(lambda module: stores_transposed(module, base.config), base_name)
        check_recorded_base(adapter, base)
        adapter.check_base(addressable, base_name)
    return addressable


def recorded_base(reference: str) -> str:
    """What an output adapter records as ``base_model_name_or_path`` for the base ``reference``: the absolute
    directory of a local or zoo model (which PEFT's ``AutoPeftModelForCausalLM`` can load from any working
    directory), else the reference itself (a Hub name)."""
    from mergelab.io import resolve_model_dir

    if reference.startswith("zoo:"):
        return str(resolve_model_dir(reference).resolve())
    path = Path(reference).expanduser()
    return str(path.resolve()) if path.is_dir() else reference


def check_recorded_base(adapter: Adapter, base: Checkpoint) -> None:
    """An adapter names the base it was trained on (``base_model_name_or_path``); when that is a local model
    directory, its architecture must be the base's (shapes alone can agree across families)."""
    recorded = adapter.base_model_name_or_path
    if not recorded:
        return
    config_file = Path(recorded).expanduser() / "config.json"
    try:
        theirs = json.loads(config_file.read_text()) if config_file.is_file() else None
    except (OSError, ValueError):
        return  # unreadable: the shapes are still checked
    if not isinstance(theirs, dict):
        return
    if not same_architecture(theirs, base.config):
        trained_on, given = architecture(theirs), architecture(base.config)
        raise InputError(
            f"adapter '{adapter.reference}' was trained on '{recorded}' ({trained_on}), but the base model "
            f"'{base.reference}' is {given}; apply it to a base of its own architecture (if you mean this one, set "
            f"base_model_name_or_path in its adapter_config.json)."
        )


def _untied_config(config: Mapping[str, Any]) -> dict[str, Any]:
    config = dict(config)
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), Mapping) and "tie_word_embeddings" in config["text_config"]:
        config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    return config


class AdaptedModel:
    """A base checkpoint with LoRA adapters applied on the fly: reads like a ``Checkpoint``.

    ``get_tensor(name)`` returns W + Σ_i w_i ΔW_i for the tensors the adapters change
    (computed in float32, or float64 for float64 bases, and returned in the base's dtype),
    and the base tensor otherwise. Nothing is written to disk. ``config`` and ``tensors``
    are the adapted model's: an untied head (see the module docstring) is one of its tensors.
    """

    def __init__(self, base: Checkpoint, adapters: Sequence[Adapter], weights: Sequence[float] | None = None,
                 reference: str | None = None):
        if not adapters:
            raise InputError("an adapted model needs at least one adapter.")
        weights = list(weights) if weights is not None else [1.0] * len(adapters)
        if len(weights) != len(adapters):
            raise InputError(f"{len(weights)} weights given for {len(adapters)} adapters; give one weight per adapter.")
        refuse_repeated(adapters, "apply each adapter once and give it the weight you mean (e.g. --weights 2).")
        self.base = base
        self.adapters = list(adapters)
        self.weights = weights
        self.reference = reference or "+".join([base.reference] + [a.reference for a in adapters])
        addressable = fit_to_base(self.adapters, base, base.reference)
        self.updates: dict[str, TensorUpdate] = plan_updates(self.adapters, weights)
        self.untied = self._untie(tied_head(base))
        self._tensors = dict(base.tensors)
        self._config = dict(base.config)
        if self.untied is not None:
            self._share_frozen_copies(self.untied)
            self._tensors[self.untied.head] = addressable[self.untied.head]
            self._config = _untied_config(base.config)

    def _untie(self, tied: Optional[Untied]) -> Optional[Untied]:
        """``tied`` when the adapters change its embeddings or head (the output is then untied), else None."""
        if tied is None:
            return None
        changed = [name for name in (tied.embed, tied.head) if name in self.updates]
        if not changed:
            return None
        roles = " and ".join(parse_name(name).role for name in changed)
        log.warning(
            "base model '%s' ties its output head to its input embeddings and the adapters change its %s; the "
            "result gets its own '%s' (tie_word_embeddings: false) so that it computes what the adapters compute "
            "unmerged", self.base.reference, roles, tied.head,
        )
        return tied

    def _share_frozen_copies(self, tied: Untied) -> None:
        """A base layer PEFT saved beside a LoRA on one tied role (``embed_tokens.base_layer.weight``) is
        loaded into the one shared matrix, so it is the other role's starting value too, unless that
        adapter saves the other role itself."""
        empty = TensorUpdate(())
        embed, head = self.updates.get(tied.embed, empty), self.updates.get(tied.head, empty)

        def frozen(term: Any) -> bool:
            return term.kind == "full" and any(".base_layer." in name for name in term.tensors)

        def shared(update: TensorUpdate, other: TensorUpdate) -> tuple[Any, ...]:
            if any(term.kind == "full" and not frozen(term) for term in other.terms):
                return ()  # an adapter saves the other role itself (modules_to_save): that copy is what it holds
            owners = {term.source for term in other.terms if term.kind == "full"}
            return tuple(term for term in update.terms if frozen(term) and term.source not in owners)

        to_head, to_embed = shared(embed, head), shared(head, embed)
        if to_head:
            self.updates[tied.head] = TensorUpdate(to_head + head.terms)
        if to_embed:
            self.updates[tied.embed] = TensorUpdate(to_embed + embed.terms)

    def source_name(self, tensor_name: str) -> str:
        """The base tensor that ``tensor_name`` starts from (an untied head starts from the embeddings)."""
        if self.untied is not None and tensor_name == self.untied.head:
            return self.untied.embed
        return tensor_name

    # ---- Checkpoint facts ----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.reference

    @property
    def path(self) -> Path:
        return self.base.path

    @property
    def config(self) -> dict[str, Any]:
        return self._config

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self._tensors

    @property
    def num_layers(self) -> int | None:
        return self.base.num_layers

    @property
    def tokenizer_files(self) -> list[Path]:
        return self.base.tokenizer_files

    def __contains__(self, tensor_name: str) -> bool:
        return tensor_name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def info(self, tensor_name: str) -> TensorInfo:
        info = self._tensors.get(tensor_name)
        return info if info is not None else self.base.info(tensor_name)

    # ---- data ----------------------------------------------------------------------------
    def get_tensor(self, tensor_name: str) -> Any:
        import torch

        weight = self.base.get_tensor(self.source_name(tensor_name))
        update = self.updates.get(tensor_name)
        if update is None:
            return weight
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        loaded = [self.adapters[index].get_tensor(name).to(work) for index, name in update.inputs]
        return update.apply(weight.to(work), loaded).to(weight.dtype)

    def close(self) -> None:
        self.base.close()
        for adapter in self.adapters:
            adapter.close()

    def __repr__(self) -> str:
        return f"AdaptedModel({self.reference!r}, {len(self.updates)} tensors changed)"


def split_adapted_reference(reference: str) -> tuple[str, list[str]]:
    """Split ``BASE+ADAPTER[+ADAPTER...]`` into its parts.

    Paths may themselves contain '+': the split whose every part exists locally wins;
    without one, each '+' separates parts (mergekit's rule, for Hub or zoo names).
    """
    parts = reference.split("+")
    if any(not part.strip() for part in parts):
        raise InputError(f"model reference '{reference}': empty part around '+'; write BASE+ADAPTER.")

    def splits(start: int) -> Iterator[list[str]]:
        if start == len(parts):
            yield []
            return
        for end in range(start + 1, len(parts) + 1):
            piece = "+".join(parts[start:end])
            if Path(piece).expanduser().exists():
                for rest in splits(end):
                    yield [piece, *rest]

    for pieces in splits(0):
        if len(pieces) >= 2:
            return pieces[0], pieces[1:]
    return parts[0], parts[1:]


def open_model(reference: str) -> Checkpoint:
    """Open a model reference as a tensor source: a model directory or a Hub ``org/name``,
    or ``BASE+ADAPTER[+ADAPTER...]`` (mergekit's syntax): the base with PEFT LoRA adapters
    applied on the fly, tensor by tensor (an ``AdaptedModel``, which reads like a Checkpoint).

    This is the one place that maps the references users write in recipes to sources,
    so that every planner understands every kind of reference. A path that exists is
    always a model directory, even when its name contains '+'.
    """
    if "+" in reference and not Path(reference).expanduser().exists():
        base_reference, adapter_references = split_adapted_reference(reference)
        base = Checkpoint(base_reference)
        adapters = [Adapter(item) for item in adapter_references]
        return AdaptedModel(base, adapters, reference=reference)  # type: ignore[return-value]
    return Checkpoint(reference)
