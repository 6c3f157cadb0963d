"""Profiler: measured per-layer costs, the file the simulator, ``auto`` and
``parallel.partition: balanced:FILE`` read.

Qi et al. 2024 ("Zero Bubble Pipeline Parallelism", ICLR, Sec. 3) compute their
schedules from profiled F, B (pp-ext's I), W and communication times, because the
best order depends on them. This measures them per layer, not per stage, so that
any cut of the model into stages (:func:`Profile.stage_costs`) and the cut itself
(:func:`pp_ext.engine.module.balanced_parts`) come from one measurement. The
embedding and the head are layers like the others, the loss counted with the last
one, so a heavy head (large vocabulary) shows up where it is.

Each layer is its own chunk of a :class:`~pp_ext.engine.module.ChunkedPipelineModule`
on one pipeline rank; its input is the previous layer's real output (detached), and
F, I, W, B are timed with the same code as ``pp-ext bench``
(:func:`pp_ext.bench.time_passes`). Activation memory is the bytes autograd saves
during the layer's forward. The p2p latency is bench's half ping-pong of one
activation (:func:`pp_ext.bench.comm_latency`).

File format (JSON)::

    {"comm": s, "micro_batch_size": b, "seq": t,
     "layers": [{"name": "Embedding", "forward": s, "input_grad": s, "weight_grad": s,
                 "backward": s, "activation_bytes": n}, ...]}
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pp_ext.schedules.costs import Costs


@dataclass(frozen=True)
class LayerCost:
    name: str
    forward: float
    input_grad: float
    weight_grad: float
    backward: float
    activation_bytes: int


@dataclass(frozen=True)
class Profile:
    layers: tuple[LayerCost, ...]
    comm: float
    micro_batch_size: int
    seq: int

    def layer_costs(self, count: int) -> list[float]:
        """Seconds of one training micro-batch (forward + fused backward) per layer."""
        if count != len(self.layers):
            raise ValueError(f"the profile measures {len(self.layers)} layers, the model has {count}: "
                             f"profile this model again (pp-ext tune --recipe ...)")
        return [layer.forward + layer.backward for layer in self.layers]

    def stage_costs(self, parts: list[int]) -> Costs:
        """Per-stage F, I, W, B (sums over each stage's layers) for the simulator."""
        self.layer_costs(parts[-1])
        stages = tuple(tuple(sum(getattr(layer, key) for layer in self.layers[a:b])
                             for key in ("forward", "input_grad", "weight_grad", "backward"))
                       for a, b in zip(parts, parts[1:]))
        return Costs(comm=self.comm, per_stage=stages)

    def activation_bytes(self, parts: list[int]) -> list[int]:
        """Bytes of one micro-batch's activations per stage."""
        return [sum(layer.activation_bytes for layer in self.layers[a:b]) for a, b in zip(parts, parts[1:])]

    def save(self, path: str | Path) -> Path:
        from pp_ext.schedules.render import write_atomic

        data = {"comm": self.comm, "micro_batch_size": self.micro_batch_size, "seq": self.seq,
                "layers": [asdict(layer) for layer in self.layers]}
        return write_atomic(path, (json.dumps(data, indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"profile {path} does not exist: write one with pp-ext tune --recipe R --profile {path}")
        try:
            data = json.loads(path.read_text())
            return cls(tuple(LayerCost(**layer) for layer in data["layers"]), float(data["comm"]),
                       int(data["micro_batch_size"]), int(data["seq"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"profile {path} is not valid ({exc}): write it again with pp-ext tune") from None


def _tensors(value) -> list:
    import torch

    if torch.is_tensor(value):
        return [value]
    return [t for item in value for t in _tensors(item)] if isinstance(value, (tuple, list)) else []


def _detached(value):
    """A layer's output as the next layer's input: no history, float parts need grad."""
    import torch

    if torch.is_tensor(value):
        return value.detach().requires_grad_(value.is_floating_point())
    return type(value)(_detached(v) for v in value)


def measure_layers(module, inputs, labels, repeats: int) -> list[LayerCost]:
    """Costs of each chunk of ``module`` (one rank holding every layer as its own
    chunk, in order), each fed the previous chunk's real output."""
    import torch

    from pp_ext.bench import time_passes
    from pp_ext.engine.module import layer_name
    from pp_ext.engine.split_backward import WeightGradStore, enable_split_backward

    store = WeightGradStore()
    enable_split_backward(module, store)
    costs, x = [], inputs
    for chunk in range(module.chunks):
        last = module.is_last_stage_chunk(chunk)

        def forward(x=x, chunk=chunk, last=last):
            out = module.chunk_forward(chunk, x)
            return module.loss_fn(out, labels) if last else out

        def backward(out):
            outs = [t for t in _tensors(out) if t.requires_grad]
            torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])

        saved = {}

        def pack(tensor):
            saved[(tensor.data_ptr(), tensor.dtype)] = tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = forward()
        f, i, w, b = time_passes(forward, backward, store, repeats)
        start = module.chunk_bounds(chunk)[0]
        costs.append(LayerCost(layer_name(module._layer_specs[start]) or f"layer {start}", f, i, w, b,
                               sum(saved.values())))
        x = None if last else _detached(out)
    module.zero_grad(set_to_none=True)
    return costs


def _tiny_worker(rank: int, world: int, options) -> Profile | None:
    import torch
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from pp_ext.bench import batches, comm_latency
    from pp_ext.engine.module import ChunkedPipelineModule
    from pp_ext.engine.tiny import layer_specs, lm_loss

    config = tiny_config(options)
    layers = layer_specs(config)
    # pipeline 1 x data 2: each rank holds every layer, one chunk each; the second
    # rank is the peer of the p2p measurement
    module = ChunkedPipelineModule(layers=layers, topology=PipeDataParallelTopology(1, world), loss_fn=lm_loss,
                                   chunks=len(layers), partition_method="uniform", seed_layers=True,
                                   base_seed=1234)
    torch.set_num_threads(1)
    comm = comm_latency(options, rank)
    if rank != 0:
        return None
    ids, labels = batches(options)[0]
    return Profile(tuple(measure_layers(module, ids, labels, options.cost_repeats)), comm,
                   options.micro_batch_size, options.seq)


def tiny_config(options):
    """The bench's Llama-shaped model (:mod:`pp_ext.engine.tiny`) at ``options``' sizes."""
    from pp_ext.engine.tiny import TinyConfig

    return TinyConfig(vocab=options.vocab, hidden=options.hidden, heads=options.heads,
                      intermediate=options.intermediate, blocks=options.blocks_per_rank * options.stages, tied=False)


def profile_tiny(options) -> Profile:
    """Profile the bench model of ``options`` (a :class:`pp_ext.bench.BenchOptions`) on this machine."""
    from pp_ext.engine.spawn import spawn

    return spawn(_tiny_worker, 2, options)[0]
