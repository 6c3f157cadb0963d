"""A LoRA training job end to end (issue 23), as the README launches it, with the ranks'
layers checked against transformers + peft in this process: checkpoints that hold the
trained tensors only, resume that continues the run exactly (also under another layout),
the export as PEFT's adapter folder and as the merged model, both giving the trained
pipeline's logits, ``train.steps=0`` with ``adapter_path`` as a conversion, a base
without weights rebuilt beside the adapter, and the one-line refusals."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from hf_checks import TOL, ids, max_diff
from train_cases import ROOT, TOLERANCE, train_cases

QUICKSTART_MODEL = ROOT / "configs/models/quickstart"
STEPS = ["train.steps=6", "checkpoint.interval=3", "checkpoint.keep=0"]


def lora(base: Path) -> list[str]:
    return [
        "peft.type=lora",
        "peft.r=4",
        "peft.lora_alpha=8",
        "peft.target_modules=all-linear",
        f"model.path={base}",
        f"model.tokenizer={QUICKSTART_MODEL}",
    ]


def tag(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def layer_states(tag_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each layer file of a checkpoint: its ``state_dict`` as DeepSpeed saved it."""
    return {
        path.name: torch.load(path, map_location="cpu", weights_only=True)
        for path in sorted(tag_dir.glob("layer_*-model_states.pt"))
    }


def pipeline_logits(tag_dir: Path, base_state: dict, config, targets, x) -> torch.Tensor:
    """The trained pipeline in one process: pp-ext's layers chained, the base's weights
    copied in by HF name, each layer's trained tensors read from its checkpoint file by
    its own ``state_dict`` names (not through the export's PEFT key names, which are
    under test)."""
    from pp_ext.checkpoint.export import saved_layers
    from pp_ext.hf import copy_hf_weights, layer_specs
    from pp_ext.peft import add_adapters
    from pp_ext.testing.reference import SequentialReference

    specs = layer_specs(config)
    chain = SequentialReference(specs, loss_fn=None)
    copy_hf_weights(chain.layers, base_state)
    layers = [(idx, chain.layers[idx]) for idx, _ in saved_layers(specs)]
    add_adapters(layers, targets, seed=0)
    for idx, layer in layers:
        frozen = {name for name, p in layer.named_parameters() if not p.requires_grad}
        (path,) = tag_dir.glob(f"layer_{idx:02d}-*model_states.pt")  # one tensor rank
        saved = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = layer.load_state_dict(saved, strict=False)
        assert not unexpected and set(missing) == frozen, (idx, missing, unexpected)
    with torch.no_grad():
        return chain(x)


def peft_logits(adapter: Path, x) -> tuple[torch.Tensor, object]:
    """PEFT's own round trip: the base named in the adapter, then the adapter on it, no
    missing or unexpected key (peft warns of either: warnings are errors here)."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pp_ext.peft.config import peft_model_warnings

    config = json.loads((adapter / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
        with peft_model_warnings():  # the one warning that is peft's own, filtered alone
            model = PeftModel.from_pretrained(base, adapter).eval()
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved.keys() == get_peft_model_state_dict(model).keys()
    with torch.no_grad():
        return model(x).logits, model


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_lora_job_checkpoints_resumes_and_exports(tmp_path, capfd):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from pp_ext.cli import main
    from pp_ext.hf import layer_specs
    from pp_ext.hf.loading import hf_initializer, layout_free_specs
    from pp_ext.peft import Targets
    from pp_ext.peft.adapters import is_adapter
    from pp_ext.testing.reference import SequentialReference
    from pp_ext.testing.spawn import spawn

    config = AutoConfig.from_pretrained(QUICKSTART_MODEL)
    torch.manual_seed(0)
    base_model = AutoModelForCausalLM.from_config(config).eval()
    base = tmp_path / "base"
    base_model.save_pretrained(base)
    before = digest(base)
    run = tmp_path / "lora"
    args = lora(base)

    def resume(run_dir: Path, step: int) -> str:
        return f"checkpoint.resume={tag(run_dir, step)}"

    cases = [
        ("lora", [*STEPS, *args]),
        ("lora-zbv", [*STEPS, *args, resume(run, 3), "parallel.schedule=zbv"]),
        (
            "lora-data-2",
            [*STEPS, *args, resume(run, 3), "parallel.pipeline=1", "parallel.micro_batches=2"],
        ),
        # at step 6 already: nothing trained, the final export merged (the recipe switch)
        ("lora-merged", [*STEPS, *args, resume(run, 6), "peft.merge=true"]),
        ("convert", ["train.steps=0", *args, f"peft.adapter_path={run / 'hf'}"]),
        (
            "random",
            ["train.steps=2", "peft.type=lora", "peft.r=4", "peft.target_modules=all-linear"],
        ),
        ("full", ["train.steps=3"]),
        ("lora-from-full", [*args, resume(tmp_path / "full", 3)]),  # refused
        ("idle-stage", [*args, "peft.target_modules=.*layers.3.*_proj"]),  # refused
    ]
    results = spawn(train_cases, 2, str(tmp_path), cases, timeout=900)[0]
    log = capfd.readouterr()
    codes = {name: code for name, (code, _) in results.items()}
    assert codes == {**{name: 0 for name, _ in cases[:7]}, "lora-from-full": 2, "idle-stage": 2}
    err = log.err + log.out
    assert "saved by a full fine-tune (peft.type=none) but the recipe has peft.type=lora" in err
    assert "pipeline rank 0 holds no module that LoRA trains" in err

    # resume is exact, under the same and under other layouts
    reference = results["lora"][1]
    assert sorted(reference) == list(range(1, 7))
    for name in ("lora-zbv", "lora-data-2"):
        resumed = results[name][1]
        assert sorted(resumed) == [4, 5, 6], (name, resumed)
        diff = max(abs(resumed[s] - reference[s]) for s in resumed)
        assert diff <= TOLERANCE, (name, diff)

    # a checkpoint holds the trained tensors and their optimizer state, no base weights
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainable, _ = get_peft_model(
        AutoModelForCausalLM.from_config(config), lora_config
    ).get_nb_trainable_parameters()
    states = layer_states(tag(run, 6))
    assert all(is_adapter(key) for state in states.values() for key in state), states.keys()
    assert sum(t.numel() for state in states.values() for t in state.values()) == trainable
    assert "MiB: adapters and their optimizer state, no base weights)" in err
    assert digest(base) == before  # the base folder untouched

    # the PEFT round trip gives the trained pipeline's logits
    x = ids()
    targets = Targets.of(lora_config, config)
    expected = pipeline_logits(tag(run, 6), base_model.state_dict(), config, targets, x)
    got, _ = peft_logits(run / "hf", x)
    assert max_diff(got, expected) <= TOL
    with torch.no_grad():
        assert max_diff(base_model(x).logits, expected) > 1e-3  # the adapters trained
    adapter_config = json.loads((run / "hf/adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base.resolve())
    assert not (run / "hf/model.safetensors").exists()

    # merged: `pp-ext export --merge` and the recipe switch write the same full model
    merged = tmp_path / "merged"
    assert main(["export", str(run / "checkpoints"), str(merged), "--merge"]) == 0
    loaded, info = AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        assert max_diff(loaded.eval()(x).logits, expected) <= TOL
    by_cli, by_recipe = (
        load_file(merged / "model.safetensors"),
        load_file(tmp_path / "lora-merged/hf/model.safetensors"),
    )
    assert by_cli.keys() == by_recipe.keys()
    assert all(torch.equal(by_cli[k], by_recipe[k]) for k in by_cli)

    # train.steps=0 with adapter_path: the same adapter, converted
    converted = load_file(tmp_path / "convert/hf/adapter_model.safetensors")
    trained = load_file(run / "hf/adapter_model.safetensors")
    assert converted.keys() == trained.keys()
    assert all(torch.equal(converted[k], trained[k]) for k in trained)

    # a base without weights (the quickstart's config): rebuilt beside the adapter as
    # the ranks initialised it (per-layer seeds), and the adapter loads on it
    random_run = tmp_path / "random"
    assert json.loads((random_run / "hf/adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str((random_run / "hf/base").resolve())
    specs = layout_free_specs(
        layer_specs(config),
        dtype=torch.float32,
        seed=1234,
        initialize=hf_initializer(config),
    )
    built = SequentialReference(specs, loss_fn=None)
    seeded = {
        hf: layer.state_dict()[local]
        for layer in built.layers
        for local, hf in layer.hf_keys().items()
    }
    expected = pipeline_logits(tag(random_run, 2), seeded, config, targets, x)
    got, model = peft_logits(random_run / "hf", x)
    assert max_diff(got, expected) <= TOL
    merged = tmp_path / "random-merged"  # merged on the rebuilt base, which it leaves out
    assert main(["export", str(random_run / "checkpoints"), str(merged), "--merge"]) == 0
    assert not (merged / "base").exists()
    with torch.no_grad():
        assert max_diff(AutoModelForCausalLM.from_pretrained(merged)(x).logits, expected) <= TOL


@pytest.mark.slow
def test_moe_lora_exports_load_in_peft(tmp_path):
    """DeepSeek-V3 and gpt-oss (issue 24): a LoRA job (aux loss on where HF adds one;
    attention by target_modules, the fused experts by target_parameters, gpt-oss's
    expert biases nonzero and frozen) exports an adapter that PEFT loads on its base with
    no missing or unexpected key and that gives the trained pipeline's logits."""
    from hf_models import MOE_CONFIGS, draw_expert_biases, reference_model
    from peft import LoraConfig

    from pp_ext.peft import Targets
    from pp_ext.testing.spawn import spawn

    families = ("deepseek_v3", "gpt_oss")
    experts = "peft.target_parameters=[experts.gate_up_proj,experts.down_proj]"
    adapted = LoraConfig(  # the recipe's peft section: lora(base) and experts
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        task_type="CAUSAL_LM",
    )
    bases, cases = {}, []
    for family in families:
        config = MOE_CONFIGS[family](False)
        config.vocab_size = 128  # the quickstart tokenizer's 103 ids
        config.max_position_embeddings = 128
        torch.manual_seed(0)
        bases[family] = reference_model(config).eval()
        draw_expert_biases(bases[family], config.initializer_range)
        bases[family].save_pretrained(tmp_path / f"{family}-base")
        cases.append((family, [*lora(tmp_path / f"{family}-base"), experts]))
    results = spawn(train_cases, 2, str(tmp_path), cases, timeout=600)[0]
    assert {name: code for name, (code, _) in results.items()} == dict.fromkeys(families, 0)
    x = ids()
    for family in families:
        config = bases[family].config
        got, _ = peft_logits(tmp_path / family / "hf", x)
        config.output_router_logits = False  # the chained layers give the logits alone
        targets = Targets.of(adapted, config)
        expected = pipeline_logits(
            tag(tmp_path / family, 3), bases[family].state_dict(), config, targets, x
        )
        assert max_diff(got, expected) <= TOL, family
        with torch.no_grad():
            assert max_diff(bases[family](x).logits, expected) > 1e-3, family  # trained
