"""Loading models to evaluate, and the fingerprints that identify them.

``load_model(path, adapters)`` reads a Hugging Face causal-LM directory (safetensors
only; validated by :class:`mergelab.io.Checkpoint` and each adapter by
:class:`mergelab.io.adapter.Adapter` first, so a bad directory fails in milliseconds with
a clear message), applies PEFT adapters in order and merges them into the weights (exact
up to float rounding, and as fast to run as the base model), and returns
``(model, tokenizer)`` in eval mode on the requested device. Adapters that each save a
full copy of the same module (``modules_to_save``, e.g. both replace ``lm_head``) are
refused: which copy wins would depend on the order, so the combination is ambiguous.

Two fingerprints, both SHA-256:

- the **identity** fingerprint (``fingerprint_directory(..., content=False)``, the results
  JSON's ``model.fingerprint``): ``config.json``, ``generation_config.json`` (it sets the
  EOS ids generation stops at), the tokenizer files (chat template included), the weight
  index (tensor names, shapes, dtypes), then each adapter's config and tensor index. Cheap:
  no weight byte is read. It says *which* model was evaluated, not that its weights are
  unchanged.
- the **content** fingerprint (the default; ``model.content_fingerprint``): the same plus
  the bytes of every weight file. Two directories with equal content fingerprints give
  equal answers, so the result cache is keyed by it. It is computed only when a cache is
  used; weight files are hashed once and remembered by (path, size, mtime, inode).

For an in-memory model, :func:`fingerprint_module` does the same from the module's config,
generation config, tokenizer and state dict (``content=True`` hashes every tensor's bytes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from mergelab.errors import ConfigError, InputError
from mergelab.io import Checkpoint
from mergelab.io.adapter import ADAPTER_CONFIG, Adapter, refuse_repeated
from mergelab.io.checkpoint import TOKENIZER_FILES
from mergelab.io.writer import LOADED_FROM

if TYPE_CHECKING:
    from mergelab.evaluate.cache import ResultCache

log = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"
_CHUNK = 16 * 1024 * 1024


def _file_digest(path: Path, cache: Optional["ResultCache"]) -> str:
    if cache is not None:
        known = cache.file_digest(path)
        if known:
            return known
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    value = digest.hexdigest()
    if cache is not None:
        cache.remember_file_digest(path, value)
    return value


def open_adapters(references: Sequence[str | os.PathLike[str]]) -> list[Adapter]:
    """Open and validate PEFT adapter directories; refuse one given twice, or two that save a full
    copy of the same module."""
    adapters = [Adapter(str(reference)) for reference in references]
    refuse_repeated(adapters, "each --adapter is merged in once, so give it once (to scale an adapter, bake it "
                              "with `mergelab lora bake --weights`).")
    owners: dict[str, Adapter] = {}
    for adapter in adapters:
        for tensor in sorted(adapter.full_tensors):
            if tensor in owners:
                module = tensor.rsplit(".", 1)[0]
                raise InputError(
                    f"adapters '{owners[tensor].reference}' and '{adapter.reference}' both save a full copy of "
                    f"'{module}' (modules_to_save): applying both is ambiguous, since the later copy would silently "
                    "replace the earlier one. Use one of them, or merge them with `mergelab lora` first."
                )
            owners[tensor] = adapter
    return adapters


def fingerprint_directory(reference: str | os.PathLike[str], adapters: Sequence[str | os.PathLike[str]] = (),
                          cache: Optional["ResultCache"] = None, content: bool = True) -> str:
    """The fingerprint of a model directory plus adapters, from disk, without loading the model.

    ``content=False`` gives the identity fingerprint (configs, tokenizer, tensor index: no
    weight byte read); ``content=True`` also hashes every weight file (see the module docstring).
    """
    checkpoint = Checkpoint(str(reference))
    opened = open_adapters(adapters)
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(label.encode() + b"\0" + len(data).to_bytes(8, "little") + data)

    add("config", (checkpoint.path / "config.json").read_bytes())
    names = [GENERATION_CONFIG] + [name for name in TOKENIZER_FILES if name != GENERATION_CONFIG]
    for name in names:
        file = checkpoint.path / name
        if file.is_file():
            add(f"file/{name}", file.read_bytes())
    index = sorted((info.name, list(info.shape), info.dtype) for info in checkpoint.tensors.values())
    add("index", json.dumps(index).encode())
    if content:
        for shard in sorted({info.file for info in checkpoint.tensors.values()}):
            add(f"weights/{shard}", _file_digest(checkpoint.path / shard, cache).encode())
    checkpoint.close()
    for position, adapter in enumerate(opened):
        add(f"adapter{position}/config", (adapter.path / ADAPTER_CONFIG).read_bytes())
        adapter_index = sorted((info.name, list(info.shape), info.dtype) for info in adapter.tensors.values())
        add(f"adapter{position}/index", json.dumps(adapter_index).encode())
        if content:
            add(f"adapter{position}/weights", _file_digest(adapter.weights_path, cache).encode())
        adapter.close()
    return ("sha256:" if content else "sha256-index:") + digest.hexdigest()


def fingerprint_module(model: Any, tokenizer: Any = None, content: bool = True) -> str:
    """The fingerprint of an in-memory model: config, generation config, tokenizer, tensor index (+ bytes).

    ``content=True`` costs one pass over the weights (about a second per GB); pass
    ``fingerprint=`` to :func:`mergelab.evaluate.evaluate` when you can name the model more cheaply.
    """
    import torch

    digest = hashlib.sha256()
    for attribute in ("config", "generation_config"):
        value = getattr(model, attribute, None)
        if value is not None and hasattr(value, "to_json_string"):
            digest.update(attribute.encode() + b"\0" + value.to_json_string(use_diff=False).encode())
    if tokenizer is not None:
        vocab = sorted(tokenizer.get_vocab().items())
        digest.update(json.dumps(vocab).encode())
        digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
        digest.update(str(tokenizer.all_special_tokens).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if content:
                flat = tensor.detach().contiguous().reshape(-1).cpu()
                digest.update(flat.view(torch.uint8).numpy().tobytes())
    return ("sha256:" if content else "sha256-index:") + digest.hexdigest()


def resolve_device(device: str) -> str:
    """Check that ``device`` exists here (cpu, cuda, cuda:N, mps)."""
    import torch

    kind = device.split(":")[0]
    if kind == "cpu":
        return device
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu.")
        return device
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {device}: MPS is not available here; use --device cpu.")
        return device
    raise ConfigError(f"unknown device '{device}'; use cpu, cuda, cuda:N or mps.")


def _torch_dtype(dtype: Optional[str]) -> Any:
    import torch

    if dtype in (None, "auto"):
        return "auto"
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16.")
    return value


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer of a model directory (the runner pads with its pad, else EOS, token)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise InputError(f"{path}: could not load the tokenizer ({type(exc).__name__}: {exc}).") from exc
    return tokenizer


def _dtype_keyword() -> str:
    """``from_pretrained``'s name for the weights dtype: ``dtype`` where transformers knows it, else ``torch_dtype``.

    Detected from the installed code, not its version string (backports and development
    builds carry numbers that say little): transformers renamed the argument in the same
    change that gave ``PretrainedConfig.__init__`` a ``dtype`` parameter (4.56); before,
    it took ``torch_dtype``, and ``from_pretrained`` ignores an argument it does not know.
    """
    import inspect

    from transformers import PretrainedConfig

    return "dtype" if "dtype" in inspect.signature(PretrainedConfig.__init__).parameters else "torch_dtype"


def load_model(reference: str | os.PathLike[str], adapters: Sequence[str | os.PathLike[str]] = (),
               device: str = "cpu", dtype: Optional[str] = "auto") -> tuple[Any, Any]:
    """Load a causal LM directory (+ PEFT adapters merged in, in order) and its tokenizer, ready to evaluate."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = _torch_dtype(dtype)
    checkpoint = Checkpoint(str(reference))  # validates the directory before anything heavy
    opened = open_adapters(adapters)
    for adapter in opened:
        adapter.close()  # validated; PEFT reads the files itself
    checkpoint.close()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint.path), use_safetensors=True,
                                                     **{_dtype_keyword(): torch_dtype})
    except Exception as exc:
        raise InputError(f"{checkpoint.path}: transformers could not load the model ({type(exc).__name__}: {exc}).") from exc
    _untie_for(model, opened)
    for adapter in opened:
        from peft import PeftModel

        try:
            with warnings.catch_warnings():  # PEFT's use of a transformers attribute it deprecated: not ours
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = PeftModel.from_pretrained(model, str(adapter.path)).merge_and_unload()
        except Exception as exc:
            raise InputError(
                f"{adapter.path}: the adapter does not fit the model {checkpoint.path} ({type(exc).__name__}: {exc})."
            ) from exc
    model.to(device)
    model.eval()
    # What evaluate() reports the model was loaded from: this directory with these adapters (with
    # adapters, their identity fingerprint as evaluate_directory computes it), with a sample of its
    # weights to tell whether they are still the ones loaded (see loaded_from).
    model.__dict__[LOADED_FROM] = {
        "path": str(reference), "adapters": [str(a) for a in adapters],
        "fingerprint": fingerprint_directory(checkpoint.path, adapters, content=False) if adapters else None,
        "sample": _weight_sample(model),
    }
    return model, load_tokenizer(checkpoint.path)


def loaded_from(model: Any) -> Optional[dict[str, Any]]:
    """What :func:`load_model` loaded into ``model`` (path, adapters, and with adapters their identity
    fingerprint), or None when
    ``model`` was not loaded by it, is a wrapper around such a model, or no longer holds the weights it
    loaded: the first entries of every weight are compared, which catches adapters merged in and other
    edits of whole tensors (an edit that spares those entries goes unseen)."""
    record = getattr(model, "__dict__", {}).get(LOADED_FROM)
    if record is None or record["sample"] != _weight_sample(model):
        return None
    return record


def _weight_sample(model: Any) -> list[float]:
    """The sum of the first 64 entries of every parameter (one transfer from the device)."""
    import torch

    with torch.no_grad():
        sums = [p.detach().reshape(-1)[:64].double().sum() for p in model.parameters()]
        return torch.stack(sums).cpu().tolist() if sums else []


def _untie_for(model: Any, adapters: Sequence[Adapter]) -> None:
    """Give a tied model's output head its own matrix when an adapter changes the embeddings or the
    head (LoRA or modules_to_save): merged into the one shared matrix, PEFT's merge_and_unload would
    change both roles, unlike the adapter it evaluates (``mergelab lora bake`` unties the same way)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or outputs.weight is not inputs.weight:
        return
    names = {id(module): name for name, module in model.named_modules()}
    roles = {names.get(id(inputs)), names.get(id(outputs))}
    touched = [adapter for adapter in adapters
               if roles & (set(adapter.modules) | {name.rsplit(".", 1)[0] for name in adapter.full_tensors})]
    if not touched:
        return
    import torch

    with torch.no_grad():  # a frozen base layer PEFT saved beside a LoRA on one role loads into the shared matrix
        for adapter in touched:
            saved_modules = {name.rsplit(".", 1)[0] for name, stored in adapter.full_tensors.items()
                             if ".base_layer." not in stored}
            for name, stored in adapter.full_tensors.items():
                module = name.rsplit(".", 1)[0]
                if ".base_layer." in stored and name.endswith("weight") and module in roles \
                        and not (roles - {module}) & saved_modules:
                    inputs.weight.copy_(adapter.get_tensor(stored).to(inputs.weight.dtype))
    outputs.weight = torch.nn.Parameter(inputs.weight.detach().clone())
    model.config.tie_word_embeddings = False
    log.warning("adapter '%s' changes the embeddings or the output head of a model that ties them; the head gets "
                "its own matrix so the model computes what the adapter computes unmerged", touched[0].reference)


@dataclass
class ModelSource:
    """A model directory to evaluate, loaded only when an answer is not in the cache.

    ``identity`` (the identity fingerprint) is computed at once, cheaply; ``content_fingerprint()``
    hashes the weights on first call (only a cache needs it); ``get()`` loads model and
    tokenizer on first use. A rerun that the cache fully serves never loads the weights.
    """

    reference: str
    adapters: list[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: Optional[str] = "auto"
    cache: Optional["ResultCache"] = None
    identity: str = ""
    _content: Optional[str] = None
    _loaded: Optional[tuple[Any, Any]] = None

    def __post_init__(self) -> None:
        resolve_device(self.device)
        _torch_dtype(self.dtype)
        if not self.identity:
            self.identity = fingerprint_directory(self.reference, self.adapters, content=False)

    def content_fingerprint(self) -> str:
        if self._content is None:
            self._content = fingerprint_directory(self.reference, self.adapters, self.cache, content=True)
        return self._content

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def get(self) -> tuple[Any, Any]:
        if self._loaded is None:
            self._loaded = load_model(self.reference, self.adapters, self.device, self.dtype)
        return self._loaded
