"""HF pipeline stages on a GPU's terms, counted on the CPU: host reads per chunk, not per
layer; what a chunk hands the next stage.

A host read (``.item()``, ``bool(tensor)``, ``.tolist()``, ``nonzero``...) waits for
every kernel queued before it, so the GPU idles while the CPU queues the next ones.
Transformers' own model reads once per forward (packed documents, padding); a stage
must read no more often than a constant per chunk and micro-batch, whatever its number
of layers. Counted by :class:`pp_ext.bench.model.StepCounts` (a TorchDispatchMode for
ops whose result size or value needs the device's data, a TorchFunctionMode for Tensor
methods that copy to the host and, on a CPU tensor, dispatch nothing).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import CONFIGS
from transformers.masking_utils import find_packed_sequence_indices

from pp_ext.bench.model import StepCounts
from pp_ext.engine.module import ChunkedPipelineModule
from pp_ext.hf import copy_hf_weights, layer_specs
from pp_ext.hf.context import layout
from pp_ext.testing.spawn import free_port, init_rank


@pytest.fixture(scope="module")
def world():
    from deepspeed import comm as dist

    if not dist.is_initialized():
        init_rank(0, 1, free_port())


def config_with(family: str, blocks: int):
    """The family's tiny config with ``blocks`` decoder layers (layer types alternating
    sliding and full where the family has them)."""
    config = copy.deepcopy(CONFIGS[family](False))
    config.num_hidden_layers = blocks
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i % 2] for i in range(blocks)]
    return config


def two_chunks(config) -> ChunkedPipelineModule:
    """One rank holding the model in two chunks: the embedding (GPT-2: and positions) and
    half the decoder layers, then the other half, final norm and head."""
    specs = layer_specs(config)
    before = 2 if config.model_type == "gpt2" else 1  # layers before the first decoder layer
    middle = before + config.num_hidden_layers // 2
    return ChunkedPipelineModule(
        specs, num_stages=1, chunks=2, partition_method=[0, middle, len(specs)]
    )


INPUTS = {
    "plain": lambda x: x,
    "padding": lambda x: (x, torch.tensor([[1] * 10, [0] * 3 + [1] * 7])),
    "packed": lambda x: (x, torch.ones_like(x), torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]] * 2)),
}


def reads_of_a_step(module: ChunkedPipelineModule, inputs) -> int:
    """Host reads over both chunks' forward and backward of one micro-batch."""
    with StepCounts() as counts:
        hidden = module.chunk_forward(0, inputs)
        boundary = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in hidden)
        logits = module.chunk_forward(1, boundary)
        logits.float().pow(2).mean().backward()
        torch.autograd.backward(hidden[0], boundary[0].grad)
    return counts.reads


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_host_reads_do_not_grow_with_layers(world, family, kind):
    """Per chunk: one read of the batch's layout; with padding (sdpa) or packed documents
    HF's mask function reads once more per mask kind (causal, sliding). So at most
    3 per chunk, and the same for 2 or 8 decoder layers per chunk."""
    x = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    counts = [
        reads_of_a_step(two_chunks(config_with(family, 2 * per_chunk)), INPUTS[kind](x))
        for per_chunk in (2, 8)
    ]
    assert counts[0] == counts[1] <= 2 * 3, counts
    if kind == "plain":
        assert counts[0] == 2  # one per chunk


def test_a_chunk_hands_on_tensors_only(world):
    """Inside a chunk the layers share a context object; the chunk's output, what crosses
    a stage, is the three tensors, and equals the layers chained by hand."""
    config = config_with("llama", 4)
    module = two_chunks(config)
    x = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    out = module.chunk_forward(0, x)
    assert isinstance(out, tuple) and len(out) == 3 and all(torch.is_tensor(t) for t in out)
    chained = x
    for layer in module.chunk_modules(0):
        chained = layer(chained)
    assert len(chained) == 4 and all(torch.equal(a, b) for a, b in zip(out, chained))


@pytest.mark.parametrize(
    "positions",
    [
        [[0, 1, 2, 3]],
        [[3, 4, 5, 6]],
        [[0, 1, 0, 1]],
        [[0, 1, 2, 3], [0, 1, 2, 0]],
        [[5]],
        [[0, 2, 3, 4]],
        [[1, 1, 2, 3]],
    ],
)
@pytest.mark.parametrize("padded", [False, True])
def test_layout_agrees_with_transformers(positions, padded):
    """The one-read layout says 'packed' exactly where transformers' own detection finds
    packed documents, and 'padded' where the mask has a 0."""
    position_ids = torch.tensor(positions)
    mask = torch.ones_like(position_ids)
    if padded:
        mask[0, 0] = 0
    code = int(layout(position_ids, mask))
    assert bool(code & 1) == (find_packed_sequence_indices(position_ids) is not None)
    assert bool(code & 2) == padded


def hf_arguments(kind: str, inputs) -> dict:
    if kind == "padding":
        return {"attention_mask": inputs[1]}
    if kind == "packed":  # HF looks for packed documents only without a KV cache (training)
        return {"position_ids": inputs[2], "use_cache": False}
    return {}


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text", "gpt_neox"])
def test_two_chunks_give_hf_logits(world, family, kind):
    """The context is per chunk: two chunks, each building its own, give HF's logits
    (the families with sliding layers and per-layer-type rope, and one with partial rotary)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = config_with(family, 4)
    hf_model = AutoModelForCausalLM.from_config(config).float().eval()
    module = two_chunks(config).eval()
    copy_hf_weights([m for c in (0, 1) for m in module.chunk_modules(c)], hf_model.state_dict())
    x = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    inputs = INPUTS[kind](x)
    with torch.no_grad():
        ours = module.chunk_forward(1, module.chunk_forward(0, inputs))
        theirs = hf_model(x, **hf_arguments(kind, inputs)).logits
    real = inputs[1].bool() if kind == "padding" else torch.ones_like(x, dtype=torch.bool)
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("interval", [1, 2])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_segments_share_the_chunks_context(world, interval, reentrant):
    """With activation checkpointing a segment hands the context on too (DeepSpeed's
    checkpoint returns what the layers returned), so only a segment that starts without
    one builds it, in its forward and again in its recomputation: at most 2 reads per
    chunk for 2 or 8 decoder layers, and the same logits and gradients as without."""
    from deepspeed.runtime.activation_checkpointing import checkpointing

    x = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    function = (
        {} if reentrant else {"activation_checkpoint_func": checkpointing.non_reentrant_checkpoint}
    )
    counts = []
    for blocks in (2, 8):
        specs = layer_specs(config_with("llama", blocks))
        runs = {}
        for every in (0, interval):
            module = ChunkedPipelineModule(
                specs,
                num_stages=1,
                partition_method="uniform",
                seed_layers=True,
                activation_checkpoint_interval=every,
                **function,
            )
            with StepCounts() as step:
                logits = module(x)
                logits.float().pow(2).mean().backward()
            runs[every] = logits, {n: p.grad for n, p in module.named_parameters()}, step.reads
        (plain, plain_grads, _), (ours, grads, count) = runs[0], runs[interval]
        assert torch.equal(plain, ours) and all(
            torch.equal(g, plain_grads[n]) for n, g in grads.items()
        )
        counts.append(count)
    assert counts[0] == counts[1] <= 2, counts
