"""Inputs with different vocabularies: crop to the shared rows, or align rows token by token.

Token-indexed tensors (input embeddings, output heads; rows = token ids) of different
models can only be merged row by row when row i means the same token in each. Two ways:

- **crop** (no tokenizer setting, the default): when the inputs' row counts differ, every
  input keeps its first n rows, n the smallest row count (logged). This assumes the
  models share token ids up to n, as when a fine-tune appended tokens to its base's
  vocabulary. The output tokenizer is the base's, with tokens at ids ≥ n removed.
- **align** (``tokenizer_source: base | union | <model>`` or ``tokenizer: {source: ...}``),
  as mergekit does: the output vocabulary is that model's tokenizer, or the union of all
  inputs' tokenizers (the base's, then every token the others add, in config order and
  id order). Each input's rows are re-laid out to the output vocabulary by token string:
  a token the input has keeps the input's row; a token it lacks takes the row of the
  only model that has it, else the base's row, else the mean of the rows of the models
  that have it (zero when none has it). Rows beyond the vocabulary (``pad_to_multiple_of``)
  take the mean of the real rows. The output tokenizer is saved beside the weights.

When every input has the same tokenizer and the same number of rows, nothing changes
(mergekit re-lays the rows out even then, dropping padding rows past the tokenizer).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from mergelab.arch import embedding_name
from mergelab.errors import ConfigError, InputError
from mergelab.io import Checkpoint

log = logging.getLogger(__name__)

UNION = "union"
BASE = "base"


# ---- the op ------------------------------------------------------------------------------


def align_rows(tensors: Sequence[Any], sources: Sequence[Sequence[int]], rows: int, base_index: Optional[int]) -> list[Any]:
    """Re-lay token-indexed ``tensors`` ([V_m, ...] each) out to ``rows`` output rows.

    ``sources[m][j]`` is the row of input m holding output token j, or −1 if input m lacks
    it; output tokens past ``len(sources[m])`` are padding. A token input m lacks takes
    the row of the base (``base_index``) if the base has it, else the mean of the inputs
    that have it (which is the donor's own row when only one has it), else zeros.
    Padding rows are the mean of the real rows. Returns one [rows, ...] tensor per input.
    """
    import torch

    first = tensors[0]
    vocab = len(sources[0])
    indices = [torch.tensor(source, dtype=torch.long, device=first.device) for source in sources]
    present = [index >= 0 for index in indices]
    gathered = [tensor[index.clamp(min=0)] for tensor, index in zip(tensors, indices)]
    missing_somewhere = ~torch.stack(present).all(dim=0)
    default = None
    if bool(missing_somewhere.any()):
        shape = (-1,) + (1,) * (first.dim() - 1)
        total = torch.zeros_like(gathered[0])
        for rows_of_model, has in zip(gathered, present):
            total += torch.where(has.view(shape), rows_of_model, 0)
        count = torch.stack(present).sum(dim=0).clamp(min=1).to(total.dtype)
        default = total / count.view(shape)
        if base_index is not None:
            default = torch.where(present[base_index].view(shape), gathered[base_index], default)
    result = []
    for rows_of_model, has in zip(gathered, present):
        aligned = torch.empty((rows,) + tuple(first.shape[1:]), dtype=first.dtype, device=first.device)
        shape = (-1,) + (1,) * (first.dim() - 1)
        aligned[:vocab] = rows_of_model if default is None else torch.where(has.view(shape), rows_of_model, default)
        if rows > vocab:
            aligned[vocab:] = aligned[:vocab].mean(dim=0)
        result.append(aligned)
    return result


@dataclass(frozen=True)
class AlignedInputs:
    """A ``TensorTask`` op: bring token-indexed inputs to one vocabulary, then run ``call``.

    ``sources`` is None to crop every input to its first ``rows`` rows, else one tuple per
    input (in task input order) mapping output token ids to input rows (see ``align_rows``).
    """

    call: Callable[[list[Any]], Any]
    rows: int
    sources: Optional[tuple[tuple[int, ...], ...]] = None
    base_index: Optional[int] = None

    def __call__(self, inputs: list[Any]) -> Any:
        if self.sources is None:
            inputs = [tensor[: self.rows] for tensor in inputs]
        else:
            inputs = align_rows(inputs, self.sources, self.rows, self.base_index)
        return self.call(inputs)

    @property
    def description(self) -> str:
        how = f"crop to {self.rows} rows" if self.sources is None else f"align to {self.rows} rows by token"
        return f"{how}, then {self.call.description}"


# ---- the plan ----------------------------------------------------------------------------


@dataclass
class Vocabulary:
    """How token-indexed tensors are brought to one vocabulary, and the tokenizer that goes with it."""

    rows: int  # rows of every token-indexed output tensor (config vocab_size)
    sources: Optional[dict[str, tuple[int, ...]]]  # None: crop; else model -> output token -> input row
    tokenizer: Any = None  # transformers tokenizer to save; None: copy the tokenizer model's files
    description: str = ""

    def op(self, call: Callable[[list[Any]], Any], models: Sequence[str], base_index: Optional[int]) -> AlignedInputs:
        if self.sources is None:
            return AlignedInputs(call, self.rows)
        return AlignedInputs(call, self.rows, tuple(self.sources[m] for m in models), base_index)


def embedding_rows(checkpoint: Checkpoint) -> Optional[int]:
    name = embedding_name(checkpoint.tensors)
    return checkpoint.info(name).shape[0] if name is not None else None


def tokenizer_dir(checkpoint: Checkpoint) -> Optional[Path]:
    names = {path.name for path in checkpoint.tokenizer_files}
    if names & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"}:
        return checkpoint.tokenizer_files[0].parent
    return None


def load_tokenizer(checkpoint: Checkpoint, reference: str, where: str) -> Any:
    from transformers import AutoTokenizer

    directory = tokenizer_dir(checkpoint)
    if directory is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(str(directory), use_fast=True)
    except Exception as exc:  # transformers raises many kinds; the user needs to know which model
        raise InputError(f"{where}: cannot load the tokenizer of model '{reference}' from {directory} ({exc}).") from None


def strip_tokenizer(tokenizer: Any, rows: int, reference: str) -> Any:
    """``tokenizer`` without the tokens whose ids are ≥ ``rows`` (they have no embedding row).

    Works on the tokenizer's JSON form: added tokens past ``rows`` are dropped, and for a
    BPE model also its vocabulary entries and the merges that produce them.
    """
    import tokenizers

    unused = {token for token, index in tokenizer.get_vocab().items() if index >= rows}
    if not unused:
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(
            f"model '{reference}': its tokenizer has {len(unused)} tokens beyond the {rows} embedding rows and is "
            "not a fast tokenizer, so they cannot be removed; use tokenizer_source: union."
        )
    data = json.loads(backend.to_str())
    data["added_tokens"] = [entry for entry in data.get("added_tokens", []) if entry["id"] < rows]
    model = data.get("model", {})
    if isinstance(model.get("vocab"), dict):
        model["vocab"] = {token: index for token, index in model["vocab"].items() if index < rows}
        if "merges" in model:
            def keep(merge: Any) -> bool:
                parts = merge.split(" ") if isinstance(merge, str) else list(merge)
                return not any(part in unused for part in parts) and "".join(parts) not in unused

            model["merges"] = [merge for merge in model["merges"] if keep(merge)]
    elif any(index >= rows for index in _model_vocab_ids(model)):
        raise InputError(
            f"model '{reference}': its tokenizer ({model.get('type')}) has tokens beyond the {rows} embedding rows "
            "that mergelab cannot remove; use tokenizer_source: union."
        )
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _model_vocab_ids(model: dict) -> list[int]:
    vocab = model.get("vocab")
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], ids are positions
        return list(range(len(vocab)))
    return []


def union_tokenizer(base: Any, others: Sequence[tuple[Any, int]]) -> Any:
    """The base tokenizer plus every token the others have (with an embedding row) and it lacks.

    ``others`` are (tokenizer, embedding rows), the base's first. Tokens are taken in
    model order, then id order; special/added tokens keep their first settings (as mergekit).
    """
    base_vocab = base.get_vocab()
    regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tokenizer, rows in others:
        added_here = {info.content: info for index, info in tokenizer.added_tokens_decoder.items() if index < rows}
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if index < rows and token not in added_here:
                regular.setdefault(token, None)
        for token, info in sorted(added_here.items(), key=lambda item: tokenizer.get_vocab()[item[0]]):
            if token in added and added[token] != info:
                log.warning("token %r is added with different settings by different models; using the first", token)
            added.setdefault(token, info)
    new_regular = [token for token in regular if token not in base_vocab and token not in added]
    if new_regular:
        base.add_tokens(new_regular)
    new_added = [info for token, info in added.items() if token not in base_vocab]
    if new_added:
        base.add_tokens(new_added)
    return base


def row_sources(tokenizer_vocab: dict[str, int], model_vocab: dict[str, int], rows: int) -> tuple[int, ...]:
    """For each output token id: the model's row for that token, or −1."""
    size = max(tokenizer_vocab.values()) + 1
    sources = [-1] * size
    for token, index in tokenizer_vocab.items():
        own = model_vocab.get(token)
        if own is not None and own < rows:
            sources[index] = own
    return tuple(sources)


def plan_vocabulary(
    config: Any,
    checkpoints: dict[str, Checkpoint],
    models: Sequence[str],
    base: Optional[str],
    source: str,
) -> Optional[Vocabulary]:
    """How the token-indexed tensors of ``models`` (base first if any) become one vocabulary.

    None when nothing needs doing. ``source`` names the recipe (for messages).
    """
    setting = config.tokenizer.source if config.tokenizer is not None else config.tokenizer_source
    pad = config.tokenizer.pad_to_multiple_of if config.tokenizer is not None else None
    field = "tokenizer.source" if config.tokenizer is not None else "tokenizer_source"
    rows = {model: embedding_rows(checkpoints[model]) for model in models}
    if any(count is None for count in rows.values()):
        return None  # no embedding to align (the planner reports missing tensors itself)
    reference = base or models[0]
    if setting is None:
        if len(set(rows.values())) == 1:
            return None
        common = min(rows.values())
        detail = ", ".join(f"'{m}': {n}" for m, n in rows.items())
        log.warning(
            "the inputs' vocabularies differ (embedding rows: %s); cropping every token-indexed tensor to the %d "
            "shared rows. To keep every model's tokens, set tokenizer_source: union.", detail, common,
        )
        tokenizer = None
        own = load_tokenizer(checkpoints[reference], reference, source)
        if own is not None and len(own.get_vocab()) > common:
            tokenizer = strip_tokenizer(own, common, reference)
        return Vocabulary(rows=common, sources=None, tokenizer=tokenizer,
                          description=f"cropped to {common} shared rows")
    where = f"{source}: {field}"
    chosen = reference if setting in (BASE, UNION) else setting
    if chosen not in checkpoints:
        raise ConfigError(f"{where}: model '{chosen}' was not opened; this is a bug in the planner.")
    if chosen not in rows:
        rows[chosen] = embedding_rows(checkpoints[chosen]) or 0
    tokenizers = {}
    for model in dict.fromkeys([*models, chosen]):
        tokenizers[model] = load_tokenizer(checkpoints[model], model, where)
    for needed in dict.fromkeys([reference, chosen]):
        if tokenizers[needed] is None:
            raise InputError(f"{where}: model '{needed}' has no tokenizer files to build the output vocabulary from.")
    for model, tokenizer in tokenizers.items():
        if tokenizer is None:
            log.warning("model '%s' has no tokenizer; assuming it is the same as '%s'", model, reference)
            tokenizers[model] = tokenizers[reference]
    vocabs = {model: tokenizer.get_vocab() for model, tokenizer in tokenizers.items()}
    counts = {rows[m] for m in models}
    if len(counts) == 1 and all(vocab == vocabs[reference] for vocab in vocabs.values()) and not pad:
        return None
    if chosen not in models and not rows[chosen]:
        rows[chosen] = len(vocabs[chosen])
    stripped = strip_tokenizer(tokenizers[chosen], rows[chosen], chosen)
    if setting == UNION:
        others = [(tokenizers[m] if m != reference else stripped, rows[m]) for m in models]
        out = union_tokenizer(stripped, others)
    else:
        out = stripped
    vocab = out.get_vocab()
    size = max(vocab.values()) + 1
    total = size if not pad else -(-size // pad) * pad
    sources = {model: row_sources(vocab, vocabs[model], rows[model]) for model in models}
    orphans = [index for index in range(size) if all(found[index] < 0 for found in sources.values())]
    if orphans:
        names = {index: token for token, index in vocab.items()}
        shown = ", ".join(repr(names.get(index, index)) for index in orphans[:5])
        log.warning("%d token(s) of the output vocabulary are in no input model (%s%s); their rows are zeros: "
                    "train them, or take the tokenizer from an input model", len(orphans), shown,
                    ", ..." if len(orphans) > 5 else "")
    kind = "union of the inputs' tokenizers" if setting == UNION else f"tokenizer of '{chosen}'"
    log.info("aligning token-indexed tensors to the %s: %d tokens, %d rows", kind, size, total)
    return Vocabulary(rows=total, sources=sources, tokenizer=out, description=f"aligned to the {kind}")
