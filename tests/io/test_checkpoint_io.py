"""Reading and writing safetensors checkpoints, checked against the safetensors library itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab.errors import ConfigError, InputError
from mergelab.io import Checkpoint, OutputDirectory, OutputTensor, ShardedWriter, parse_size


def test_checkpoint_reads_what_safetensors_reads(llama):
    checkpoint = Checkpoint(llama.path("ft1"))
    reference = load_file(f"{llama.path('ft1')}/model.safetensors")
    assert sorted(checkpoint.tensors) == sorted(reference)
    for name, tensor in reference.items():
        info = checkpoint.info(name)
        assert info.shape == tuple(tensor.shape) and info.dtype == "float32"
        assert torch.equal(checkpoint.get_tensor(name), tensor)
    assert checkpoint.num_layers == 4
    assert {p.name for p in checkpoint.tokenizer_files} >= {"tokenizer.json", "tokenizer_config.json"}


def test_every_dtype_round_trips(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).to(torch.float16),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "i64": torch.arange(5),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    layout = [OutputTensor(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()]
    writer = ShardedWriter(tmp_path, layout)
    for name, tensor in reversed(list(tensors.items())):  # any write order
        writer.write(name, tensor)
    writer.close()
    (tmp_path / "config.json").write_text("{}")
    back = load_file(str(tmp_path / "model.safetensors"))
    ours = Checkpoint(tmp_path)
    for name, tensor in tensors.items():
        assert torch.equal(back[name], tensor), name
        assert torch.equal(ours.get_tensor(name), tensor), name


def test_shards_and_index(tmp_path):
    tensors = {f"t{i}": torch.full((250,), float(i)) for i in range(10)}  # 1000 bytes each
    layout = [OutputTensor(name, (250,), "float32") for name in tensors]
    writer = ShardedWriter(tmp_path, layout, max_shard_bytes=2500)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 10_000
    assert index["weight_map"]["t3"] == "model-00002-of-00005.safetensors"
    (tmp_path / "config.json").write_text("{}")
    checkpoint = Checkpoint(tmp_path)
    assert torch.equal(checkpoint.get_tensor("t9"), tensors["t9"])


def test_writer_rejects_unplanned_or_misshaped_tensors(tmp_path):
    writer = ShardedWriter(tmp_path, [OutputTensor("a", (2,), "float32")])
    with pytest.raises(ValueError, match="not part of the planned output"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match="planned"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()


def test_truncated_file_is_reported(tmp_path):
    save_file({"a": torch.zeros(100)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-50])
    with pytest.raises(InputError, match="truncated"):
        Checkpoint(tmp_path)


def test_index_listing_a_missing_shard(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(InputError, match="gone.safetensors"):
        Checkpoint(tmp_path)


def test_output_directory_is_atomic(tmp_path):
    destination = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with OutputDirectory(destination) as temporary:
            (temporary / "half.txt").write_text("partial")
            raise RuntimeError("boom")
    assert not destination.exists() and list(tmp_path.iterdir()) == []
    with OutputDirectory(destination) as temporary:
        (temporary / "done.txt").write_text("complete")
    assert (destination / "done.txt").read_text() == "complete"
    with pytest.raises(ConfigError, match="--force"):
        OutputDirectory(destination)
    with OutputDirectory(destination, force=True) as temporary:
        (temporary / "new.txt").write_text("new")
    assert sorted(p.name for p in destination.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["is the input", "contains the input"])
def test_output_directory_never_replaces_its_inputs(tmp_path, where):
    model = tmp_path / "models" / "ft1"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    destination = model if where == "is the input" else tmp_path / "models"
    alias = tmp_path / "alias"
    alias.symlink_to(model)  # the same input under another name: compared as resolved paths
    for inputs in ([model], [alias]):
        with pytest.raises(ConfigError, match=f"{where.split()[0]} the input '{re.escape(str(model))}'.*would delete that input"):
            OutputDirectory(destination, force=True, inputs=inputs)
    assert (model / "config.json").read_text() == "{}"
    with OutputDirectory(tmp_path / "models" / "merged", force=True, inputs=[model]) as temporary:  # inside is fine
        (temporary / "done.txt").write_text("complete")
    assert (model / "config.json").exists() and (tmp_path / "models" / "merged" / "done.txt").exists()


def test_output_directory_never_replaces_a_file(tmp_path):
    destination = tmp_path / "notes.txt"
    destination.write_text("precious")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        OutputDirectory(destination, force=True)
    assert destination.read_text() == "precious"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_directory_in_an_unwritable_place_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot create the output '/proc/merged'.*writable place"):
        OutputDirectory("/proc/merged")


@pytest.mark.parametrize("text", ["0", "0GB", "-5MB", "-3", "inf"])
def test_parse_size_refuses_sizes_below_one_byte(text):
    with pytest.raises(ConfigError, match="--out-shard-size"):
        parse_size(text, "--out-shard-size")


@pytest.mark.parametrize(
    "text, size", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1e9", 10**9), ("100", 100)]
)
def test_parse_size(text, size):
    assert parse_size(text) == size


def _safetensors_file(path: Path, entries: list[tuple[str, str, list[int], bytes]]) -> None:
    """Write a safetensors file by hand, in the given order (the library would reorder, and align)."""
    header, data = {}, b""
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)


def test_a_mapped_tensor_is_private_and_unmapped_when_dropped(tmp_path):
    tensor = torch.arange(300_000, dtype=torch.float32)
    save_file({"a": tensor}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    checkpoint = Checkpoint(tmp_path)
    file = str((tmp_path / "model.safetensors").resolve())

    def mappings() -> int:
        return Path("/proc/self/maps").read_text().count(file)

    before = mappings()
    read = checkpoint.get_tensor("a")
    if Path("/proc/self/maps").exists():
        assert mappings() > before
    read.mul_(-1)  # copy-on-write: this process's copy only
    assert torch.equal(read, -tensor)
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["a"], tensor)
    assert torch.equal(checkpoint.get_tensor("a"), tensor)
    del read
    if Path("/proc/self/maps").exists():
        assert mappings() == before


def test_tensors_not_aligned_to_their_element_size_are_read(tmp_path):
    odd = torch.tensor([7], dtype=torch.uint8)
    value = torch.tensor([1.5, -2.25, 3.0], dtype=torch.float32)
    _safetensors_file(tmp_path / "model.safetensors", [
        ("odd", "U8", [1], odd.numpy().tobytes()),
        ("value", "F32", [3], value.numpy().tobytes()),  # data starts one byte after an 8-byte boundary
    ])
    (tmp_path / "config.json").write_text("{}")
    checkpoint = Checkpoint(tmp_path)
    assert torch.equal(checkpoint.get_tensor("value"), value)
    assert torch.equal(checkpoint.get_tensor("odd"), odd)


def test_a_file_truncated_after_opening_is_reported(tmp_path):
    save_file({"a": torch.zeros(100_000)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    checkpoint = Checkpoint(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-5000])
    with pytest.raises(InputError, match="unexpected end of file reading 'a'"):
        checkpoint.get_tensor("a")


def test_an_adapter_where_a_model_is_expected_says_how_to_apply_it(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(InputError, match="is a PEFT adapter, not a model: give its base model here, or apply the adapter to it \\(BASE\\+ADAPTER"):
        Checkpoint(str(tmp_path))


def test_a_missing_relative_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=f"'runs/models/base' does not exist \\(looked for {re.escape(str(tmp_path))}/runs"):
        Checkpoint("runs/models/base")


def test_a_missing_local_path_is_not_taken_for_a_hub_name(tmp_path, monkeypatch):
    from mergelab.io.adapter import Adapter
    from mergelab.io.checkpoint import looks_like_hub_name

    monkeypatch.chdir(tmp_path)
    for local in ("nomodel/", "./org/name", "~/name", "org/name/extra", "org/..", "a b/c"):
        assert not looks_like_hub_name(local), local
    assert looks_like_hub_name("meta-llama/Llama-3.1-8B") and looks_like_hub_name("Qwen/Qwen2.5-14B")
    with pytest.raises(InputError, match="model path 'nomodel/' does not exist"):  # no Hub request, no HF error text
        Checkpoint("nomodel/")
    with pytest.raises(InputError, match="^adapter path 'nope/' does not exist"):
        Adapter("nope/")
