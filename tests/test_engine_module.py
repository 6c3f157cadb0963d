"""ChunkedPipelineModule: partitioning, chunk layout, tied layers, checkpoints.

Layouts for any number of ranks are checked through the pure helpers; the module
itself runs in this process as a world of one rank (p = 1, one or two chunks), and
one slow test spawns 2 ranks to check what each rank builds and how ties are joined.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from pp_ext.engine.module import ChunkedPipelineModule, layer_param_counts, partition
from pp_ext.planning.partition import chunk_layout, layer_rank
from pp_ext.schedules.placement import Placement
from pp_ext.testing.spawn import spawn

VOCAB, HIDDEN = 16, 8


def head(embedding: nn.Embedding, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head tied to the embedding: logits from the embedding's weight."""
    return hidden @ embedding.weight.t()


def float_layers(blocks: int) -> list:
    """Linear, tanh, Linear, tanh, ...: float in, float out, a callable among modules."""
    return [
        LayerSpec(nn.Linear, HIDDEN, HIDDEN) if i % 2 == 0 else torch.tanh for i in range(blocks)
    ]


def tied_layers(blocks: int) -> list:
    return [
        TiedLayerSpec("embed", nn.Embedding, VOCAB, HIDDEN),
        *float_layers(blocks),
        TiedLayerSpec("embed", nn.Embedding, VOCAB, HIDDEN, forward_fn=head),
    ]


class NeedsRealData(nn.Module):
    """A constructor that reads a tensor's value, which the meta device cannot."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(int(torch.tensor(3).item())))


def deepspeed_counts(layers: list) -> list[int]:
    """What PipelineModule counts for 'parameters' (it only reads ``_layer_specs``)."""
    return PipelineModule._count_layer_params(SimpleNamespace(_layer_specs=layers))


# --- pure helpers: no process group ----------------------------------------------------


def test_parameter_counts_match_deepspeed_without_allocating():
    layers = tied_layers(4) + [nn.Linear(HIDDEN, 2), NeedsRealData()]
    assert layer_param_counts(layers) == deepspeed_counts(layers)
    assert layer_param_counts([NeedsRealData()]) == [3]  # built for real when meta cannot
    # 40 G parameters: 160 GB if DeepSpeed's way built it
    assert layer_param_counts([LayerSpec(nn.Linear, 200_000, 200_000)]) == [200_000**2 + 200_000]


def test_partition_methods_agree_with_deepspeed():
    from deepspeed.runtime.utils import partition_balanced, partition_uniform

    layers = tied_layers(6)
    assert partition(layers, 4, "uniform") == partition_uniform(len(layers), 4)
    assert partition(layers, 4, "parameters") == partition_balanced(deepspeed_counts(layers), 4)
    linear = [
        int(i in PipelineModule._find_layer_type(SimpleNamespace(_layer_specs=layers), "linear"))
        for i in range(len(layers))
    ]
    assert partition(layers, 3, "type:LINEAR") == partition_balanced(linear, 3)
    assert partition(layers, 2, [0, 1, 8]) == [0, 1, 8]


@pytest.mark.parametrize(
    "method, message",
    [
        ([0, 3, 8], "has 3 boundaries, 3 stages need 4"),
        ([1, 3, 5, 8], "must start at 0 and end at the number of layers"),
        ([0, 3, 5, 7], "must start at 0 and end at the number of layers"),
        ([0, 5, 5, 8], "must be strictly increasing"),
        ("profile", "partition_method must be 'parameters', 'uniform', 'type:REGEX' or a list"),
        ("type:conv", "matches no layer: layer types are"),
    ],
)
def test_partition_rejects_bad_methods(method, message):
    with pytest.raises(ValueError, match=message):
        partition(tied_layers(6), 3, method)


def test_too_few_layers_names_the_fix():
    with pytest.raises(
        ValueError, match="3 layers cannot fill 4 pipeline stages.*use fewer chunks or fewer"
    ):
        partition(float_layers(3), 4, "uniform")


def test_chunk_layout_loop_and_v():
    parts = [0, 2, 4, 6, 8]
    assert chunk_layout(Placement.loop(2, 2), parts, 0) == [(0, 2), (4, 6)]
    assert chunk_layout(Placement.loop(2, 2), parts, 1) == [(2, 4), (6, 8)]
    assert chunk_layout(Placement.v(2, 2), parts, 0) == [(0, 2), (6, 8)]
    assert chunk_layout(Placement.v(2, 2), parts, 1) == [(2, 4), (4, 6)]
    for placement in (Placement.loop(4, 3), Placement.v(4, 2), Placement.v(3, 4)):
        parts = list(range(placement.stages + 1))
        held = sorted(
            b for rank in range(placement.ranks) for b in chunk_layout(placement, parts, rank)
        )
        assert held == [(s, s + 1) for s in range(placement.stages)]


@pytest.mark.parametrize(
    "placement, ranks",
    [
        (Placement.loop(2, 2), {0, 1}),
        (Placement.loop(4, 2), {0, 3}),
        (Placement.v(2, 2), {0}),
        (Placement.v(4, 2), {0}),
        (Placement.loop(1, 2), {0}),
    ],
)
def test_tied_embedding_and_head_ranks(placement, ranks):
    """DeepSpeed joins the ranks that hold the tied layers: with V both ends are on rank 0."""
    layers = tied_layers(2 * placement.stages)
    parts = partition(layers, placement.stages, "uniform")
    assert {layer_rank(placement, parts, i) for i in (0, len(layers) - 1)} == ranks


# --- the module, in a world of one rank ------------------------------------------------


def build(layers, cls=ChunkedPipelineModule, seed=1234, **kwargs):
    kwargs.setdefault("partition_method", "uniform")
    return cls(layers, num_stages=1, seed_layers=True, base_seed=seed, **kwargs)


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("interval", [0, 1])
def test_one_chunk_is_pipeline_module(world, interval):
    ours = build(float_layers(5), activation_checkpoint_interval=interval)
    theirs = build(float_layers(5), cls=PipelineModule, activation_checkpoint_interval=interval)
    theirs._precompute_checkpointable_values()  # the engine's job for PipelineModule
    assert ours.partitions() == theirs.partitions() == [0, 5]
    x = torch.randn(3, HIDDEN, requires_grad=True)
    out = ours(x)
    assert torch.equal(out, theirs(x))
    out.sum().backward()
    theirs(x).sum().backward()
    assert grads(ours).keys() == grads(theirs).keys()
    assert all(torch.equal(g, grads(theirs)[name]) for name, g in grads(ours).items())


def test_two_chunks_loop_one_rank(world):
    module = build(float_layers(6), chunks=2)
    assert (module.placement.name, module.chunks, module.num_stages) == ("loop", 2, 1)
    assert [module.chunk_bounds(c) for c in (0, 1)] == [(0, 3), (3, 6)]
    assert [module.stage_of_chunk(c) for c in (0, 1)] == [0, 1]
    assert module.is_first_stage_chunk(0) and not module.is_last_stage_chunk(0)
    assert module.is_last_stage_chunk(1) and not module.is_first_stage_chunk(1)
    assert [module.stage_owner(i) for i in range(6)] == [0] * 6
    first, second = ({id(p) for p in module.chunk_parameters(c)} for c in (0, 1))
    assert not first & second and first | second == {id(p) for p in module.parameters()}
    x = torch.randn(3, HIDDEN)
    reference = x
    for name in "024":
        reference = torch.tanh(module._modules[name](reference))
    assert torch.equal(module.chunk_forward(1, module.chunk_forward(0, x)), reference)


def test_checkpointed_chunk_recomputes_its_own_layers(world):
    """Chunk 1's backward runs while chunk 0 is active: recomputation must still run chunk 1."""
    plain, checkpointed = (
        build(float_layers(6), chunks=2, activation_checkpoint_interval=k) for k in (0, 1)
    )
    for module in (plain, checkpointed):
        x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0), requires_grad=True)
        module.chunk_forward(1, module.chunk_forward(0, x)).pow(2).sum().backward()
    assert all(torch.equal(g, grads(plain)[name]) for name, g in grads(checkpointed).items())


def test_v_tied_embedding_and_head_share_one_module(world):
    module = build(tied_layers(4), chunks=2, placement="v")
    assert [module.chunk_bounds(c) for c in (0, 1)] == [(0, 3), (3, 6)]
    embedding = module.tied_modules["embed"]
    assert module.tied_comms == {}
    assert module.chunk_modules(0)[0] is embedding and module.chunk_modules(1)[-1] is embedding
    assert all(any(p is embedding.weight for p in module.chunk_parameters(c)) for c in (0, 1))
    ids = torch.randint(VOCAB, (2, 5))
    logits = module.chunk_forward(1, module.chunk_forward(0, ids))
    logits.sum().backward()
    # the same computation by hand: both uses of the weight add to its gradient
    weight = embedding.weight.detach().requires_grad_()
    h = torch.tanh(module._modules["3"](torch.tanh(module._modules["1"](weight[ids]))))
    (h @ weight.t()).sum().backward()
    assert torch.equal(logits, h @ weight.t()) and torch.allclose(
        embedding.weight.grad, weight.grad
    )


@pytest.mark.parametrize("placement", ["loop", "v"])
def test_checkpoint_round_trip(world, tmp_path, placement):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    saved = build(tied_layers(4), chunks=2, placement=placement)
    saved.checkpoint_parallel_write_pipeline = False  # set by DeepSpeed's engine
    saved.save_state_dict(str(tmp_path), TorchCheckpointEngine())
    # layer 2 and 4 are tanh, the head (5) is a forward_fn: no state
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        f"layer_{i:02d}-model_states.pt" for i in (0, 1, 3)
    ]
    loaded = build(tied_layers(4), chunks=2, placement=placement, seed=99)
    assert not torch.equal(loaded.tied_modules["embed"].weight, saved.tied_modules["embed"].weight)
    loaded.load_state_dir(str(tmp_path), TorchCheckpointEngine())
    assert all(torch.equal(t, saved.state_dict()[k]) for k, t in loaded.state_dict().items())


def test_bad_arguments(world):
    with pytest.raises(
        ValueError, match="placement must be one of loop, v, bidirectional, got 'ring'"
    ):
        build(float_layers(4), chunks=2, placement="ring")
    with pytest.raises(ValueError, match="even number of pipeline stages, got 1"):
        build(float_layers(4), chunks=2, placement="bidirectional")
    with pytest.raises(ValueError, match="chunks must be a positive int, got 0"):
        build(float_layers(4), chunks=0)
    with pytest.raises(ValueError, match="use fewer chunks or fewer pipeline stages"):
        build(float_layers(3), chunks=4)
    assert build(float_layers(4), chunks=2, partition_method=[0, 1, 4]).chunk_bounds(1) == (1, 4)


# --- two ranks --------------------------------------------------------------------------


def layout(module: ChunkedPipelineModule) -> dict:
    embed = module.tied_modules["embed"] if "embed" in module.tied_modules else None
    return {
        "bounds": [module.chunk_bounds(c) for c in range(module.chunks)],
        "layers": sorted(int(name) for name in module._modules if name.isdigit()),
        "tied": list(module.tied_modules),
        "comms": {k: c["ranks"] for k, c in module.tied_comms.items()},
        "head_is_embedding": embed is not None and module.chunk_modules(1)[-1] is embed,
    }


def two_rank_layouts(rank: int, world_size: int) -> dict:
    from deepspeed import comm as dist

    v, loop = (
        ChunkedPipelineModule(
            tied_layers(6), num_stages=2, chunks=2, placement=placement, partition_method="uniform"
        )
        for placement in ("v", "loop")
    )
    # loop: both ranks hold the tie (embedding on 0, head on 1), so these collectives run on both
    weight = loop.tied_modules["embed"].weight
    # a backward through the tie: DeepSpeed's grad-mode broadcast of it left a c10d::broadcast_
    # node there, which warns (an error under the suite's filterwarnings, passed to the ranks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (weight * 1.0).sum().backward()
    gathered = [torch.empty_like(weight) for _ in range(world_size)]
    dist.all_gather(gathered, weight.detach())
    weight.grad = torch.full_like(weight, rank + 1.0)
    loop.allreduce_tied_weight_gradients()
    synced = (torch.equal(gathered[0], gathered[1]), weight.grad.unique().tolist())
    return {"v": layout(v), "loop": {**layout(loop), "synced": synced}}


@pytest.mark.slow
def test_two_ranks_build_their_own_layers_and_ties():
    """8 layers in 4 stages of 2: embed 0, linears 1 3 5, tanh 2 4 6, head 7."""
    (v0, v1), (loop0, loop1) = zip(
        *((r["v"], r["loop"]) for r in spawn(two_rank_layouts, 2, timeout=120))
    )
    # V: rank 0 holds stages 0 and 3 (embedding and head: one module, no exchange)
    assert v0 == {
        "bounds": [(0, 2), (6, 8)],
        "layers": [1],
        "tied": ["embed"],
        "comms": {},
        "head_is_embedding": True,
    }
    assert v1 == {
        "bounds": [(2, 4), (4, 6)],
        "layers": [3, 5],
        "tied": [],
        "comms": {},
        "head_is_embedding": False,
    }
    # loop: the head is on rank 1, so the tie spans both ranks: weights synchronised, grads summed
    assert loop0["bounds"] == [(0, 2), (4, 6)] and loop1["bounds"] == [(2, 4), (6, 8)]
    assert loop0["layers"] == [1, 5] and loop1["layers"] == [3]
    assert not loop0["head_is_embedding"] and loop1["head_is_embedding"]
    assert loop0["comms"] == loop1["comms"] == {"embed": [0, 1]}
    assert loop0["synced"] == loop1["synced"] == (True, [3.0])


def test_a_deepspeed_without_the_pipeline_hooks_is_refused_in_one_line():
    """The engine overrides DeepSpeed's _train_schedule, _inference_schedule and
    _loss_stage_global_rank (0.19.8 on): without them train_batch would run DeepSpeed's
    own schedule, so such a DeepSpeed is refused, naming what is missing and the fix."""
    from pp_ext.engine.boundary import HOOKS, DeepSpeedTooOld, missing_hooks, require_hooks

    assert missing_hooks(PipelineModule) == list(HOOKS)  # not an engine: none of them
    from deepspeed.runtime.pipe.engine import PipelineEngine

    require_hooks(PipelineEngine, "installed")  # the installed DeepSpeed has them all

    class Old:  # DeepSpeed 0.19.7's PipelineEngine, as far as the hooks go
        def train_batch(self):
            pass

    with pytest.raises(DeepSpeedTooOld) as err:
        require_hooks(Old, "0.19.7")
    message = str(err.value)
    assert "\n" not in message and "deepspeed>=0.19.8" in message
    assert all(name in message for name in HOOKS) and "DeepSpeed 0.19.7" in message
