"""Per-stage loading from safetensors folders, and pipeline modules built from HF folders.

Every family of tests/hf_models.py is saved with ``save_pretrained`` in small shards;
the layers of each stage load only their own tensors from the folder, and chained
(SequentialReference, as one stage after another) give the HF model's logits. The
logit checks are tests/hf_checks.py's (test_hf_llama runs them too), here on a ``models`` fixture
whose layers come from disk. ``build_pipeline_module`` runs in a world of one rank.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from hf_checks import (
    MXFP4_EXPERTS,
    TOL,
    by_hf_key,
    check_no_padding,
    check_packed_sequences,
    check_padding,
    ids,
    layers_by_hf_key,
    logits_and_aux,
    max_diff,
    save_mxfp4,
)
from hf_models import ALL_CONFIGS, CONFIGS, reference_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Mxfp4Config

import pp_ext.hf.loading as loading
from pp_ext.hf import build_pipeline_module, layer_specs, load_hf_weights
from pp_ext.hf.weights import checkpoint_names
from pp_ext.testing.reference import SequentialReference

SHARD = "20KB"  # a tiny model is ~90 KB: several shards
FAMILIES = [(f, tied) for f in ALL_CONFIGS for tied in (True, False)]


def family_id(param) -> str:
    return f"{param[0]}-{'tied' if param[1] else 'untied'}"


def hf_model(family: str, tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    return reference_model(ALL_CONFIGS[family](tied)).eval()  # HF's default attention


def stages(chain: SequentialReference, count: int = 2) -> list[list]:
    """The chain's layers cut into ``count`` contiguous stages."""
    bounds = [round(i * len(chain.layers) / count) for i in range(count + 1)]
    return [chain.layers[a:b] for a, b in zip(bounds, bounds[1:])]


class CountingReads:
    """``safe_open`` that records which files were opened, which tensors were read whole
    (``tensors``) or in part (``slices``: key and index), and the bytes read."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.tensors: list[str] = []
        self.slices: list[tuple[str, object]] = []
        self.bytes = 0

    def __call__(self, path, *args, **kwargs):
        counter, handle = self, safe_open(path, *args, **kwargs)
        self.files.add(str(path))

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return handle.keys()

            def get_tensor(self, key):
                counter.tensors.append(key)
                tensor = handle.get_tensor(key)
                counter.bytes += tensor.nbytes
                return tensor

            def get_slice(self, key):
                whole = handle.get_slice(key)

                class Slice:
                    def __getitem__(self, index):
                        counter.slices.append((key, index))
                        part = whole[index]
                        counter.bytes += part.nbytes
                        return part

                return Slice()

        return Handle()


@pytest.fixture(scope="module", params=FAMILIES, ids=family_id)
def saved(request, tmp_path_factory):
    family, tied = request.param
    model = hf_model(family, tied)
    folder = tmp_path_factory.mktemp(family_id(request.param))
    model.save_pretrained(folder, max_shard_size=SHARD)
    return model, folder


@pytest.fixture(scope="module")
def models(saved):
    """test_hf_llama's fixture, with each stage's layers loaded from the sharded folder."""
    model, folder = saved
    chain = SequentialReference(layer_specs(model.config), loss_fn=None)
    for stage in stages(chain):
        load_hf_weights(stage, folder)
    return model, chain


def test_no_padding(models):
    check_no_padding(*models)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding(models, side):
    check_padding(*models, side)


def test_packed_sequences(models):
    check_packed_sequences(*models)


def test_folder_is_sharded(saved):
    _, folder = saved
    assert (
        len(list(folder.glob("model-*.safetensors"))) >= 3
        and (folder / "model.safetensors.index.json").exists()
    )


def test_a_stage_reads_only_its_tensors(saved, monkeypatch):
    model, folder = saved
    files = loading.weight_map(folder / "model.safetensors.index.json")
    chain = SequentialReference(layer_specs(model.config), loss_fn=None)
    for stage in stages(chain, 3):
        reads = CountingReads()
        monkeypatch.setattr(loading, "safe_open", reads)
        load_hf_weights(stage, folder)
        # as stored: GPT-NeoX's lm_head is embed_out on disk, an MoE model's fused experts
        # one tensor per expert
        names = {k for layer in stage for k in layer.hf_keys().values()}
        needed = {key for keys in checkpoint_names(names, model).values() for key in keys}
        assert sorted(reads.tensors) == sorted(needed)  # each needed tensor once, nothing else
        assert reads.files == {str(files[key]) for key in needed}
        assert len(reads.files) < len(set(files.values()))


def shard_experts(chain: SequentialReference, rank: int) -> None:
    """Every MoE layer's experts cut to those of ``rank`` in an expert group of 2."""
    from pp_ext.moe import dispatch, experts

    for module in chain.modules():
        if isinstance(module, experts.DeferrableExperts):
            dispatch.shard(module, dispatch.ExpertAxis(2, rank))


EXPERT_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
FUSED = ("experts.gate_up_proj", "experts.down_proj")


@pytest.mark.parametrize("stored", ["hub", "fused"])
@pytest.mark.parametrize("family", EXPERT_FAMILIES)
def test_an_expert_rank_reads_only_its_experts(tmp_path, monkeypatch, family, stored):
    """Each rank of an expert group of 2 (4 experts: 2 each) loads from a checkpoint as
    the hub stores it (save_pretrained: one tensor per expert, Mixtral's
    ``block_sparse_moe.experts.N.w1``, the others' ``experts.N.gate_proj``) or fused as the
    model holds them: it reads the tensors of its own experts only (fused: rows
    ``2 rank``, ``2 rank + 1`` of dim 0), half of the experts' bytes, and its weights are
    transformers' ``from_pretrained``'s, its experts their rows."""
    model = hf_model(family, False)
    if stored == "hub":
        model.save_pretrained(tmp_path, max_shard_size=SHARD)
    else:
        model.config.save_pretrained(tmp_path)
        fused = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(fused, tmp_path / "model.safetensors", metadata={"format": "pt"})
    keys = list(loading.weight_map(loading.weights_file(tmp_path)))
    per_expert = [k for k in keys if re.search(r"\.experts\.\d+\.", k)]
    assert (stored == "hub") == bool(per_expert) and (stored == "hub") != any(
        k.endswith(FUSED) for k in keys
    )
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    expert_bytes = sum(v.nbytes for k, v in theirs.items() if k.endswith(FUSED))
    for rank in range(2):
        own = range(2 * rank, 2 * rank + 2)
        chain = SequentialReference(layer_specs(model.config), loss_fn=None)
        shard_experts(chain, rank)
        reads = CountingReads()
        monkeypatch.setattr(loading, "safe_open", reads)
        load_hf_weights(chain.layers, tmp_path)
        monkeypatch.undo()
        whole = [k for k in keys if k not in per_expert and not k.endswith(FUSED)]
        mine = [k for k in per_expert if int(re.search(r"experts\.(\d+)\.", k)[1]) in own]
        assert sorted(reads.tensors) == sorted(whole + mine)
        rows = (slice(own.start, own.stop),)
        assert sorted(reads.slices) == sorted((k, rows) for k in keys if k.endswith(FUSED))
        dense = sum(v.nbytes for k, v in theirs.items() if not k.endswith(FUSED))
        assert reads.bytes == dense + expert_bytes // 2
        ours = layers_by_hf_key(chain.layers)
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            want = value[own.start : own.stop] if key.endswith(FUSED) else value
            assert torch.equal(ours[key], want), key


def test_mxfp4_checkpoint_is_dequantized_per_stage(world, tmp_path, monkeypatch):
    """A gpt-oss checkpoint in the hub's MXFP4 layout: each of 3 stages reads only its
    tensors (an expert weight: its blocks and scales), and the weights are those of
    transformers' ``from_pretrained(..., quantization_config=Mxfp4Config(dequantize=True))``
    and of the codes the test wrote; each rank of an expert group of 2 reads only its
    experts' rows of the blocks, scales and biases, and gets their rows; in bf16 too,
    where the logits are its."""
    model = hf_model("gpt_oss", False)
    coded = save_mxfp4(model, tmp_path)
    files = loading.weight_map(tmp_path / "model.safetensors.index.json")
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=Mxfp4Config(dequantize=True)
    )
    assert not hasattr(reference.config, "quantization_config")
    theirs = reference.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in coded.items()) and len(coded) == 4
    chain = SequentialReference(layer_specs(loading.load_config(tmp_path)), loss_fn=None)
    for stage in stages(chain, 3):
        reads = CountingReads()
        monkeypatch.setattr(loading, "safe_open", reads)
        load_hf_weights(stage, tmp_path)
        names = {k for layer in stage for k in layer.hf_keys().values()}
        needed = [
            stored
            for name in names
            for stored in (
                [f"{name}_blocks", f"{name}_scales"] if name.endswith(MXFP4_EXPERTS) else [name]
            )
        ]
        assert sorted(reads.tensors) == sorted(needed)
        assert reads.files == {str(files[key]) for key in needed}
    ours = layers_by_hf_key(chain.layers)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)

    for rank in range(2):  # an expert rank of 2: rows of the blocks and scales, biases
        chain = SequentialReference(layer_specs(loading.load_config(tmp_path)), loss_fn=None)
        shard_experts(chain, rank)
        reads = CountingReads()
        monkeypatch.setattr(loading, "safe_open", reads)
        load_hf_weights(chain.layers, tmp_path)
        rows = (slice(2 * rank, 2 * rank + 2),)
        read_rows = [index if isinstance(index, tuple) else (index,) for _, index in reads.slices]
        assert all(index == rows for index in read_rows) and sorted(
            key for key, _ in reads.slices
        ) == sorted(k for k in files if ".experts." in k)
        assert not [k for k in reads.tensors if ".experts." in k]  # nothing of them whole
        ours = layers_by_hf_key(chain.layers)
        assert all(
            torch.equal(ours[k], v[rows] if ".experts." in k else v) for k, v in theirs.items()
        )

    monkeypatch.undo()
    module = build_pipeline_module(tmp_path, num_stages=1, dtype="bfloat16")
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16
    )
    theirs = reference.state_dict()
    assert all(torch.equal(t, theirs[k]) for k, t in by_hf_key(module).items())
    x = ids()
    with torch.no_grad():
        logits, _ = module.chunk_forward(0, x)
        assert max_diff(logits.float(), reference(x).logits.float()) == 0.0


def test_single_file(tmp_path):
    model = hf_model("qwen2", False)
    model.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    chain = SequentialReference(layer_specs(model.config), loss_fn=None)
    for stage in stages(chain):
        load_hf_weights(stage, tmp_path)
    x = ids()
    with torch.no_grad():
        assert max_diff(chain(x), model(x).logits) <= TOL


def test_loading_errors(tmp_path):
    model = hf_model("llama", True)
    chain = SequentialReference(layer_specs(model.config), loss_fn=None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_weights(chain.layers, tmp_path / "nowhere")
    model.config.save_pretrained(tmp_path)
    with pytest.raises(
        FileNotFoundError, match="has no model.safetensors or model.safetensors.index.json"
    ):
        load_hf_weights(chain.layers, tmp_path)
    state = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k not in ("lm_head.weight", "model.norm.weight")
    }
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        KeyError, match=r"model.safetensors has no tensor 'model.norm.weight', needed by FinalNorm"
    ):
        load_hf_weights(chain.layers, tmp_path)
    model.save_pretrained(tmp_path / "fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="quantized with 'fp8': pp-ext loads plain tensors or MXFP4"
    ):
        load_hf_weights(chain.layers, tmp_path / "fp8")


# --- build_pipeline_module, in a world of one rank -------------------------------------


@pytest.mark.parametrize("family", ["qwen3", "deepseek_v3"])
def test_build_loads_every_weight_in_dtype(world, tmp_path, family):
    """bf16 weights on disk, a bf16 module: every tensor equal to HF's ``from_pretrained``
    in bf16, in its dtype (DeepSeek-V3's router weight and bias float32, as HF's
    ``_keep_in_fp32_modules_strict`` keeps them; the rest bf16), rotary tables still
    float32 as in HF, and the logits HF's."""
    model = hf_model(family, True).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size=SHARD)
    module = build_pipeline_module(
        tmp_path, num_stages=1, chunks=2, partition_method="uniform", dtype="bfloat16"
    )
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ours, theirs = by_hf_key(module), reference.state_dict()
    assert ours.keys() == theirs.keys() - {"lm_head.weight"}
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    assert {t.dtype for t in ours.values()} == (
        {torch.bfloat16, torch.float32} if family == "deepseek_v3" else {torch.bfloat16}
    )
    assert {b.dtype for name, b in module.named_buffers() if "inv_freq" in name} == {torch.float32}
    x = ids()
    with torch.no_grad():
        out = module.chunk_forward(1, module.chunk_forward(0, x))
        assert max_diff(out.float(), reference(x).logits.float()) == 0.0


@pytest.mark.parametrize("family,tied", FAMILIES, ids=map(family_id, FAMILIES))
def test_random_init_is_hfs_and_layout_free(world, tmp_path, family, tied):
    """A config-only model: the same weights for any chunks / placement / partition,
    from a folder or a config; HF's initialisation (constants exactly, random tensors
    with HF's spread); and the HF model given these weights computes the same logits."""
    config = ALL_CONFIGS[family](tied)
    config.save_pretrained(tmp_path)
    layouts = [
        dict(model=tmp_path),
        dict(model=config, chunks=2, partition_method="uniform"),
        dict(
            model=config, chunks=2, placement="v", partition_method=[0, 3, len(layer_specs(config))]
        ),
    ]
    modules = [build_pipeline_module(num_stages=1, **layout) for layout in layouts]
    first, *others = map(by_hf_key, modules)
    assert all(
        first.keys() == o.keys() and all(torch.equal(first[k], o[k]) for k in first) for o in others
    )

    torch.manual_seed(1)
    reference = AutoModelForCausalLM.from_config(config).eval()  # HF's own initialisation
    theirs = reference.state_dict()
    for key, ours in first.items():
        if theirs[key].unique().numel() == 1:  # ones, zeros: HF's constant initialisations
            assert torch.equal(ours, theirs[key]), key
        elif ours.numel() < 32:  # one value per head or expert (gpt-oss's sinks, router bias)
            assert ours.unique().numel() == ours.numel(), key  # random, too few for a spread
        else:
            assert abs(ours.std() / theirs[key].std() - 1) < 0.2, key
    reference.load_state_dict(first, strict=not tied)
    x = ids()
    with torch.no_grad():
        out, _ = logits_and_aux(modules[1].chunk_forward(1, modules[1].chunk_forward(0, x)))
        assert max_diff(out, reference(x).logits) <= TOL


def test_build_errors(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder .* does not exist"):
        build_pipeline_module(tmp_path / "nowhere", num_stages=1)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        build_pipeline_module(tmp_path, num_stages=1)
    with pytest.raises(
        ValueError, match="dtype must be one of float32, bfloat16, float16, got 'fp8'"
    ):
        build_pipeline_module(CONFIGS["llama"](True), num_stages=1, dtype="fp8")
