"""``pp-ext export`` / ``export_checkpoint``: a pipeline checkpoint back to a HF folder.

Checkpoints come from DeepSpeed's own ``PipelineModule.save_state_dict`` (a world of
one rank, two chunks) or, in the slow test, from ``engine.save_checkpoint`` after a
2-rank training; ``from_pretrained`` must load the export with no missing or
unexpected key, and give the trained model's logits.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from hf_checks import TOL, by_hf_key, ids, max_diff, save_mxfp4
from hf_models import ALL_CONFIGS, CONFIGS, MOE_CONFIGS, reference_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Mxfp4Config, PreTrainedTokenizerFast

import pp_ext.checkpoint.export as export
from pp_ext.checkpoint.export import export_checkpoint, save_hf_metadata
from pp_ext.cli import main
from pp_ext.hf import build_pipeline_module

TAG = "global_step3"


def tokenizer(vocab_size: int = 100) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary (no download needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w2")


def hf_folder(path, family: str, tied: bool, mxfp4: bool = False):
    """A saved tiny HF model with its tokenizer (``mxfp4``: gpt-oss in the hub's MXFP4
    layout, :func:`hf_checks.save_mxfp4`); returns the model."""
    torch.manual_seed(0)
    model = reference_model(ALL_CONFIGS[family](tied)).eval()
    if mxfp4:
        save_mxfp4(model, path)
    else:
        model.save_pretrained(path, max_shard_size="20KB")
    tokenizer().save_pretrained(path)
    return model


def checkpoint(tmp_path, family: str, tied: bool, mxfp4: bool = False):
    """A DeepSpeed save dir (``latest`` -> TAG) of the model loaded into a 2-chunk
    pipeline module, with hf_meta; returns (save dir, HF model, module)."""
    model = hf_folder(tmp_path / "hf", family, tied, mxfp4)
    module = build_pipeline_module(
        tmp_path / "hf", num_stages=1, chunks=2, placement="v", partition_method="uniform"
    )
    save_dir = tmp_path / "ckpt"
    module.checkpoint_parallel_write_pipeline = False  # the engine's default, set from its config
    module.save_state_dict(str(save_dir / TAG), TorchCheckpointEngine())
    (save_dir / "latest").write_text(TAG)
    save_hf_metadata(save_dir / TAG, tmp_path / "hf")
    return save_dir, model, module


@pytest.mark.parametrize(
    "family,tied",
    [
        ("llama", True),
        ("gpt_neox", False),
        ("qwen2", False),
        ("mixtral", False),
        ("qwen2_moe", True),
        ("deepseek_v3", False),
        ("gpt_oss", False),
    ],
)
def test_export_loads_in_hf(world, tmp_path, family, tied):
    """MoE models: the fused experts written back one tensor per expert, as save_pretrained
    writes them (the parts of one fused tensor in one shard)."""
    save_dir, model, module = checkpoint(tmp_path, family, tied)
    assert main(["export", str(save_dir), str(tmp_path / "out"), "--max-shard-size", "20KB"]) == 0
    out = tmp_path / "out"
    # the same files and tensor names as save_pretrained wrote (e.g. GPT-NeoX's embed_out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    original = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index["weight_map"].keys() == original["weight_map"].keys()
    assert len(set(index["weight_map"].values())) >= 3
    # an MoE model's per-expert tensors fill the shards otherwise (transformers' split views)
    same_files = {p.name for p in (tmp_path / "hf").iterdir()} == {p.name for p in out.iterdir()}
    assert same_files or family in MOE_CONFIGS

    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    theirs = loaded.state_dict()
    assert all(torch.equal(t, theirs[k]) for k, t in by_hf_key(module).items())
    x = ids()
    with torch.no_grad():
        assert max_diff(loaded.eval()(x).logits, model(x).logits) <= TOL
    text = "w5 w7 w99"
    assert (
        AutoTokenizer.from_pretrained(out)(text).input_ids
        == AutoTokenizer.from_pretrained(tmp_path / "hf")(text).input_ids
    )


def test_mxfp4_model_exports_dequantized(world, tmp_path):
    """gpt-oss loaded from MXFP4 exports fused bf16 tensors and a config without
    ``quantization_config``: from_pretrained loads them plainly, to the tensors of
    ``from_pretrained(MXFP4 folder, quantization_config=Mxfp4Config(dequantize=True))``."""
    save_dir, _, module = checkpoint(tmp_path, "gpt_oss", False, mxfp4=True)
    out = export_checkpoint(save_dir / TAG, tmp_path / "out", dtype="bfloat16")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    dequantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16
    ).state_dict()
    theirs = loaded.state_dict()
    assert theirs.keys() == dequantized.keys()
    assert all(
        t.dtype == torch.bfloat16 and torch.equal(t, dequantized[k]) for k, t in theirs.items()
    )
    assert all(torch.equal(t.bfloat16(), theirs[k]) for k, t in by_hf_key(module).items())


def test_export_in_bfloat16_one_file(world, tmp_path):
    save_dir, model, _ = checkpoint(tmp_path, "qwen3", True)
    out = export_checkpoint(save_dir / TAG, tmp_path / "out", dtype="bfloat16")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = load_file(out / "model.safetensors")
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert tensors.keys() == expected.keys()
    assert all(
        t.dtype == torch.bfloat16 and torch.equal(t, expected[k].bfloat16())
        for k, t in tensors.items()
    )


def run(capsys, *argv) -> tuple[int, str]:
    code = main(["export", *map(str, argv)])
    return code, capsys.readouterr().err


def siblings(path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}"))


def test_cli_errors(world, tmp_path, capsys):
    save_dir, _, _ = checkpoint(tmp_path, "llama", False)
    capsys.readouterr()  # save_pretrained's progress bars
    out = tmp_path / "out"
    cases = [
        ((tmp_path / "nowhere", out), "checkpoint folder .*nowhere does not exist"),
        ((tmp_path / "hf", out), "has no 'latest' file and no hf_meta/: pass --tag"),
        ((save_dir, out, "--tag", "step9"), f"has no tag 'step9': its tags are {TAG}"),
        ((save_dir, out, "--max-shard-size", "lots"), "max shard size 'lots'"),
    ]
    for argv, message in cases:
        code, err = run(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert re.search(f"^pp-ext: error: .*{message}", err), err
    assert run(capsys, save_dir, out, "--dtype", "fp8")[0] == 2  # argparse's choices
    assert not out.exists() and siblings(out) == []

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run(capsys, save_dir, out)
    assert code == 2 and "already exists and is not empty: pass overwrite (--overwrite)" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert run(capsys, save_dir, out, "--overwrite")[0] == 0
    assert (
        (out / "config.json").exists() and not (out / "keep.txt").exists() and siblings(out) == []
    )

    layer = save_dir / TAG / "layer_01-model_states.pt"
    (save_dir / TAG / "layer_01-model_01-model_states.pt").write_bytes(layer.read_bytes())
    code, err = run(capsys, save_dir, tmp_path / "tp")
    assert code == 2 and "holds layer 1 in 2 tensor-parallel slices" in err
    (save_dir / TAG / "layer_01-model_01-model_states.pt").unlink()
    layer.unlink()
    code, err = run(capsys, save_dir, tmp_path / "partial")
    assert code == 2 and "has no layer_01-model_states.pt: the checkpoint is incomplete" in err
    (save_dir / TAG / "hf_meta" / "config.json").unlink()
    code, err = run(capsys, save_dir, tmp_path / "meta")
    assert (
        code == 2
        and "has no hf_meta/config.json: the training job writes it with pp_ext.hf.save_hf_metadata"
        in err
    )


def test_key_set_is_checked(world, tmp_path, monkeypatch):
    """Tensors the HF model lacks, or tensors it needs and the checkpoint lacks: named, nothing written."""
    save_dir, _, _ = checkpoint(tmp_path, "llama", False)
    real = export.checkpoint_tensors

    def renamed(tag_dir, config, adapters=None):
        tensors = real(tag_dir, config, adapters)
        tensors["model.extra.weight"] = tensors.pop("model.norm.weight")
        return tensors

    monkeypatch.setattr(export, "checkpoint_tensors", renamed)
    with pytest.raises(
        export.ExportError,
        match=r"missing \['model.norm.weight'\], unexpected \['model.extra.weight'\]",
    ):
        export_checkpoint(save_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and siblings(tmp_path / "out") == []


def test_a_crash_leaves_the_old_folder(world, tmp_path, monkeypatch):
    save_dir, _, _ = checkpoint(tmp_path, "llama", True)
    out = export_checkpoint(save_dir, tmp_path / "out", max_shard_size="20KB")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    written, real_save = [], export.save_file

    def save_then_crash(tensors, path, metadata=None):  # the second shard fails
        if written:
            raise OSError("disk full")
        written.append(path)
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(export, "save_file", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(save_dir, out, dtype="bfloat16", max_shard_size="20KB", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and siblings(out) == []
    written.clear()
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(save_dir, tmp_path / "new", max_shard_size="20KB")
    assert not (tmp_path / "new").exists() and siblings(tmp_path / "new") == []


def test_metadata_files(tmp_path):
    """Config and generation config from the model, every non-weight file from the tokenizer folder."""
    hf_folder(tmp_path / "hf", "llama", True)
    tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text("{{ messages }}")
    (tmp_path / "tok" / "config.json").write_text("{}")  # not the model's: ignored
    meta = save_hf_metadata(tmp_path / "tag", tmp_path / "hf", tmp_path / "tok")
    assert sorted(p.name for p in meta.iterdir()) == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (meta / "config.json").read_text() == (tmp_path / "hf" / "config.json").read_text()
    meta = save_hf_metadata(tmp_path / "tag2", CONFIGS["qwen2"](False))
    assert [p.name for p in meta.iterdir()] == ["config.json"]
    with pytest.raises(FileNotFoundError, match="tokenizer folder .* does not exist"):
        save_hf_metadata(tmp_path / "tag3", tmp_path / "hf", tmp_path / "nowhere")


# --- round trip: 2-rank training, engine.save_checkpoint, export, from_pretrained -------

ROUND_TRIP = [
    ("llama", "zbv", True),
    ("qwen2", "1f1b", False),
    ("gpt_neox", "interleaved-1f1b", False),
]


def train_and_save(rank: int, world: int, root, cases: list) -> dict:
    """On each rank: every case trained from its HF folder (each rank loading only its
    layers) for 2 SGD steps and saved; and a config-only model built with zbv's layout.
    Returns this rank's tensors by HF name, as numpy arrays (sent by value: torch
    tensors would go through shared memory that dies with the rank)."""
    from deepspeed import comm as dist
    from hf_checks import batch, shifted_loss

    import pp_ext
    from pp_ext.schedules import get

    out = {}
    for family, schedule, tied in cases:
        spec = get(schedule)
        module = build_pipeline_module(
            root / family,
            num_stages=2,
            chunks=spec.default_chunks,
            placement=spec.placement,
            partition_method="uniform",
            loss_fn=shifted_loss,
        )
        engine, *_ = pp_ext.initialize(
            model=module,
            optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
            config={
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 4,
                "train_batch_size": 8,
            },
            schedule=schedule,
        )
        for step in range(2):
            engine.train_batch(iter([batch(step, k) for k in range(4)]))
        engine.save_checkpoint(str(root / f"{family}-ckpt"), tag="final")
        if rank == 0:
            save_hf_metadata(root / f"{family}-ckpt" / "final", root / family)
        dist.barrier()
        out[family] = {k: t.detach().numpy() for k, t in by_hf_key(module).items()}
    module = build_pipeline_module(root / "config-only", num_stages=2, chunks=2, placement="v")
    out["config-only"] = {k: t.detach().numpy() for k, t in by_hf_key(module).items()}
    return out


@pytest.mark.slow
def test_trained_checkpoint_round_trip(tmp_path):
    from pp_ext.hf import copy_hf_weights, layer_specs
    from pp_ext.hf.loading import hf_initializer, layout_free_specs
    from pp_ext.testing.reference import SequentialReference
    from pp_ext.testing.spawn import spawn

    initial = {family: hf_folder(tmp_path / family, family, tied) for family, _, tied in ROUND_TRIP}
    config = CONFIGS["qwen3"](True)
    config.save_pretrained(tmp_path / "config-only")
    ranks = [
        {
            case: {k: torch.from_numpy(a) for k, a in tensors.items()}
            for case, tensors in rank.items()
        }
        for rank in spawn(train_and_save, 2, tmp_path, ROUND_TRIP, timeout=600)
    ]

    failures = []
    for family, schedule, _ in ROUND_TRIP:
        trained = {**ranks[0][family], **ranks[1][family]}
        assert (
            main(["export", str(tmp_path / f"{family}-ckpt"), str(tmp_path / f"{family}-out")]) == 0
        )
        loaded, info = AutoModelForCausalLM.from_pretrained(
            tmp_path / f"{family}-out", output_loading_info=True
        )
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (
            family,
            info,
        )
        theirs = loaded.eval().state_dict()
        assert all(torch.equal(t, theirs[k]) for k, t in trained.items()), family
        assert (
            max(max_diff(t, initial[family].state_dict()[k]) for k, t in trained.items()) > 1e-3
        )  # it trained
        chain = SequentialReference(layer_specs(loaded.config), loss_fn=None)
        copy_hf_weights(chain.layers, trained)
        x = ids()
        with torch.no_grad():
            diff = max_diff(chain(x), loaded(x).logits)
        if diff > TOL:
            failures.append(f"{family} ({schedule}): logits differ by {diff:.2e}")
    assert not failures, "\n".join(failures)

    # a config-only model: the same weights on 2 ranks (zbv) as built in one process
    reference = SequentialReference(
        layout_free_specs(
            layer_specs(config), dtype=torch.float32, seed=1234, initialize=hf_initializer(config)
        ),
        loss_fn=None,
    )
    built = {**ranks[0]["config-only"], **ranks[1]["config-only"]}
    expected = {
        hf: layer.state_dict()[local]
        for layer in reference.layers
        for local, hf in layer.hf_keys().items()
    }
    assert built.keys() == expected.keys() and all(
        torch.equal(built[k], expected[k]) for k in built
    )
