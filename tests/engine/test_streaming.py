"""The engine streams: resident inputs are bounded by the prefetch window, not the model size."""

from __future__ import annotations

import weakref

import pytest
import torch
import yaml

from mergelab import engine
from mergelab.engine import TaskOutput, TensorRef, TensorTask
from mergelab.errors import ComputeError
from mergelab.io import LiveModelSink, OutputTensor, ShardedWriter
from mergelab.merge import load_and_plan
from mergelab.zoo.random_models import make_model, make_variant


LIVE = {"bytes": 0, "peak": 0}


def _release(size: int) -> None:
    LIVE["bytes"] -= size


class TrackingSource:
    """Wraps a checkpoint; records how many bytes of the tensors it handed out are still alive."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.reads: list[str] = []

    def info(self, name):
        return self.checkpoint.info(name)

    def get_tensor(self, name):
        tensor = self.checkpoint.get_tensor(name)
        self.reads.append(name)
        size = tensor.numel() * tensor.element_size()
        LIVE["bytes"] += size
        LIVE["peak"] = max(LIVE["peak"], LIVE["bytes"])
        weakref.finalize(tensor, _release, size)
        return tensor



def peak_live_input_bytes(tmp_path, layers: int, prefetch: int) -> tuple[int, int, int]:
    """Merge a ``layers``-deep model; return (peak live input bytes, largest task's inputs, all inputs)."""
    root = tmp_path / f"l{layers}"
    base = make_model(root / "base", "llama", layers=layers, hidden=64, intermediate=128, tokenizer=False)
    make_variant(base, root / "ft", seed=1)
    recipe = root / "r.yml"
    recipe.write_text(yaml.safe_dump({
        "models": [{"model": str(root / "ft"), "parameters": {"weight": 0.5}}],
        "base_model": str(base), "merge_method": "task_arithmetic",
    }))
    plan, _ = load_and_plan(recipe)
    sources = {key: TrackingSource(checkpoint) for key, checkpoint in plan.checkpoints.items()}
    LIVE.update(bytes=0, peak=0)
    out = root / "out"
    out.mkdir()
    engine.run(plan.tasks, sources, ShardedWriter(out, plan.layout), prefetch=prefetch, progress=False)
    sizes = [task.input_bytes(plan.checkpoints) for task in plan.tasks]
    return LIVE["peak"], max(sizes), sum(sizes)


@pytest.mark.parametrize("prefetch", [1, 2])
def test_peak_inputs_do_not_grow_with_layers(tmp_path, prefetch):
    peak_8, largest_8, total_8 = peak_live_input_bytes(tmp_path, layers=8, prefetch=prefetch)
    peak_16, largest_16, total_16 = peak_live_input_bytes(tmp_path, layers=16, prefetch=prefetch)
    assert largest_8 == largest_16 and total_16 > 1.5 * total_8
    # The task being computed plus the prefetch window, whatever the depth (exact peaks vary
    # with thread timing, the bound does not).
    for peak in (peak_8, peak_16):
        assert largest_16 <= peak <= (prefetch + 1) * largest_16
    assert peak_16 < total_16 / 5
    assert LIVE["bytes"] == 0  # every input was released


def test_every_input_is_read_once(tmp_path, llama):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({
        "models": [{"model": llama.path("ft1"), "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": llama.path("ft2"), "parameters": {"weight": 1.0, "density": 0.5}}],
        "base_model": llama.path("base"), "merge_method": "ties",
    }))
    plan, _ = load_and_plan(recipe)
    sources = {key: TrackingSource(checkpoint) for key, checkpoint in plan.checkpoints.items()}
    (tmp_path / "out").mkdir()
    engine.run(plan.tasks, sources, ShardedWriter(tmp_path / "out", plan.layout), progress=False)
    for key, source in sources.items():
        assert sorted(source.reads) == sorted(source.checkpoint.tensors), key


class ListSource:
    def __init__(self, tensors):
        self.tensors = tensors

    def get_tensor(self, name):
        return self.tensors[name].clone()

    def info(self, name):
        from mergelab.io.checkpoint import TensorInfo

        tensor = self.tensors[name]
        return TensorInfo(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), "memory")


class Collect:
    def __init__(self):
        self.tensors = {}
        self.closed = False
        self.aborted = False

    def write(self, name, tensor):
        self.tensors[name] = tensor

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = True


def test_multi_output_tasks_and_metrics():
    source = ListSource({"a": torch.arange(6.0).reshape(2, 3)})

    def split(inputs):
        (a,) = inputs
        return TaskOutput((a[0], a[1] * 2), {"norm": float(a.norm())})

    task = TensorTask(
        (OutputTensor("first", (3,), "float32"), OutputTensor("second", (3,), "float16")),
        (TensorRef("src", "a"),),
        split,
    )
    sink = Collect()
    stats = engine.run([task], {"src": source}, sink, progress=False)
    assert torch.equal(sink.tensors["first"], torch.tensor([0.0, 1.0, 2.0]))
    assert sink.tensors["second"].dtype == torch.float16
    assert torch.equal(sink.tensors["second"], torch.tensor([6.0, 8.0, 10.0], dtype=torch.float16))
    assert stats.metrics["first"]["norm"] == pytest.approx(float(torch.arange(6.0).norm()))
    assert sink.closed and not sink.aborted


def test_non_finite_output_stops_the_run():
    source = ListSource({"a": torch.ones(3)})
    task = TensorTask((OutputTensor("x", (3,), "float32"),), (TensorRef("src", "a"),), lambda t: t[0] / 0)
    sink = Collect()
    with pytest.raises(ComputeError, match="'x' contains NaN or infinite values"):
        engine.run([task], {"src": source}, sink, progress=False)
    assert not sink.closed


def test_live_model_sink_updates_a_module_in_place():
    module = torch.nn.Linear(3, 2)
    sink = LiveModelSink(module)
    source = ListSource({"w": torch.full((2, 3), 0.5), "b": torch.tensor([1.0, -1.0])})
    tasks = [
        TensorTask((OutputTensor("weight", (2, 3), "float32"),), (TensorRef("s", "w"),), lambda t: t[0] * 2),
        TensorTask((OutputTensor("bias", (2,), "float32"),), (TensorRef("s", "b"),), lambda t: t[0]),
    ]
    weight_storage = module.weight.data_ptr()
    engine.run(tasks, {"s": source}, sink, progress=False)
    assert torch.equal(module.weight.detach(), torch.ones(2, 3))
    assert torch.equal(module.bias.detach(), torch.tensor([1.0, -1.0]))
    assert module.weight.data_ptr() == weight_storage  # updated in place, no re-allocation


def test_a_failed_run_aborts_the_sink_and_a_writer_leaves_no_open_files(tmp_path):
    source = ListSource({"a": torch.ones(3)})
    layout = (OutputTensor("x", (3,), "float32"), OutputTensor("y", (3,), "float32"))
    tasks = [TensorTask((layout[0],), (TensorRef("src", "a"),), lambda t: t[0]),
             TensorTask((layout[1],), (TensorRef("src", "a"),), lambda t: t[0] / 0)]
    sink = Collect()
    with pytest.raises(ComputeError):
        engine.run(tasks, {"src": source}, sink, progress=False)
    assert sink.aborted and not sink.closed
    writer = ShardedWriter(tmp_path, layout)
    with pytest.raises(ComputeError):
        engine.run(tasks, {"src": source}, writer, progress=False)
    assert writer._fds == []  # aborted: every shard descriptor closed, no index written
    assert not (tmp_path / "model.safetensors.index.json").exists()
