"""The recipe's ``peft`` section: PEFT's ``LoraConfig`` from it, target modules chosen as
``peft.get_peft_model`` chooses them on every family, and one-line errors for bad input
(no process is launched)."""

from __future__ import annotations

import peft
import pytest
import torch
from hf_models import CONFIGS, MOE_CONFIGS
from packaging.version import Version
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from recipe_cases import one_line_error
from transformers import AutoConfig, AutoModelForCausalLM

from pp_ext.config.recipe import load
from pp_ext.hf import moe
from pp_ext.peft import (
    PeftError,
    check_adapter,
    check_experts,
    check_modules_to_save,
    lora_config,
    target_names,
)

TARGETS = [
    None,  # PEFT's default for the family
    "all-linear",
    ["q_proj", "v_proj", "c_attn", "query_key_value"],
    r".*\.(\w+_proj|c_attn|c_fc|dense\w*)",  # a full match, as PEFT reads a string
]


def _reference(model_type: str, targets) -> list[str]:
    """The modules peft's own get_peft_model wraps on transformers' model."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[model_type](False))
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=2, target_modules=targets, fan_in_fan_out=model_type == "gpt2"
    )
    peft_model = get_peft_model(model, lora)
    prefix = "base_model.model."
    return [
        name.removeprefix(prefix)
        for name, module in peft_model.named_modules()
        if isinstance(module, BaseTunerLayer)
    ]


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_targets_are_those_get_peft_model_wraps(model_type):
    config = CONFIGS[model_type](False)
    for targets in TARGETS:
        lora = LoraConfig(
            task_type="CAUSAL_LM", r=2, target_modules=targets, fan_in_fan_out=model_type == "gpt2"
        )
        before = lora.to_dict()
        try:
            expected = _reference(model_type, targets)
        except ValueError:  # this family has none of the listed names
            with pytest.raises(PeftError):
                target_names(lora, config)
            continue
        names = target_names(lora, config)
        assert names == expected, (model_type, targets)
        assert lora.to_dict() == before  # the caller's config is left as it was


def test_targets_that_match_nothing_list_the_linear_modules():
    lora = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["qproj"])
    with pytest.raises(PeftError) as error:
        target_names(lora, CONFIGS["llama"](False))
    message = str(error.value)
    assert "\n" not in message
    assert "matches no module of this llama model" in message
    assert "q_proj, up_proj, v_proj" in message


def test_recipe_section_is_peft_lora_config(recipe_file):
    recipe = load(
        recipe_file,
        [
            "peft.type=lora",
            "peft.r=4",
            "peft.lora_alpha=16",
            "peft.lora_dropout=0.1",
            "peft.target_modules=[q_proj,v_proj]",
            "peft.use_rslora=true",
            "peft.modules_to_save=[lm_head]",
        ],
    )
    lora = lora_config(recipe.peft, AutoConfig.from_pretrained(recipe.model.path))
    assert lora == LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        use_rslora=True,
        modules_to_save=["lm_head"],
    )
    assert load(recipe_file).peft.type == "none"
    regex = load(recipe_file, ["peft.type=lora", "peft.target_modules=.*proj"])
    regex = lora_config(regex.peft, AutoConfig.from_pretrained(regex.model.path))
    assert regex.target_modules == ".*proj"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["peft.type=qlora"], "recipe key 'peft.type' is 'qlora': choose one of none, lora"),
        (["peft.r=0"], "recipe key 'peft.r' must be >= 1, got 0"),
        (["peft.type=none", "peft.merge=true"], "recipe key 'peft.merge' merges LoRA adapters"),
        (["peft.lora_alpha=0"], "recipe key 'peft.lora_alpha' must be a finite number > 0"),
        (["peft.lora_dropout=1.0"], "recipe key 'peft.lora_dropout' must be in [0, 1), got 1.0"),
        (["peft.target_modules=[]"], "recipe key 'peft.target_modules' must be a list"),
        (["peft.target_modules=3"], "recipe key 'peft.target_modules' must be a list"),
        (["peft.target_parameters=[3]"], "recipe key 'peft.target_parameters' must be a list"),
        (
            ["peft.adapter_path=/nonexistent/adapter"],
            "recipe key 'peft.adapter_path' is /nonexistent/adapter, which holds no "
            "adapter_config.json",
        ),
    ],
)
def test_bad_peft_sections_name_the_key_and_the_fix(recipe_file, overrides, expected):
    assert expected in one_line_error(load, recipe_file, ["peft.type=lora", *overrides])


@pytest.mark.parametrize(
    "family, tied, names, expected",
    [
        ("gpt_neox", False, ["embed_out"], "names 'embed_out', which matches no module"),
        ("llama", True, ["lm_head"], "trains lm_head, one half of this model's tied embedding"),
        ("llama", True, ["embed_tokens"], "trains model.embed_tokens, one half of this model's"),
    ],
)
def test_modules_to_save_that_match_nothing_or_half_a_tie(family, tied, names, expected):
    """PEFT skips a name that matches nothing and trains an untied copy of a tied module,
    both silently: one line each; untied halves and other modules pass."""
    lora = LoraConfig(r=2, target_modules="all-linear", modules_to_save=names)
    with pytest.raises(PeftError) as error:
        check_modules_to_save(lora, CONFIGS[family](tied))
    assert expected in str(error.value) and "\n" not in str(error.value)
    for family, tied, names in (
        ("gpt_neox", False, ["lm_head"]),
        ("llama", False, ["lm_head", "embed_tokens"]),
        ("llama", True, ["norm"]),
    ):
        check_modules_to_save(LoraConfig(r=2, modules_to_save=names), CONFIGS[family](tied))


def test_adapter_folder_for_another_rank_or_base(tmp_path):
    base = tmp_path / "base"
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"](False))
    model.save_pretrained(base)
    adapter = tmp_path / "adapter"
    lora = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(adapter)
    assert check_adapter(adapter, lora, str(base))["r"] == 2
    for other, fix in (
        (LoraConfig(r=4), "has rank r=2 but the recipe has peft.r=4: set peft.r=2"),
        (lora, f"was made for base model {base}, not model.path {tmp_path}"),
    ):
        with pytest.raises(PeftError) as error:
            check_adapter(adapter, other, str(tmp_path) if other is lora else str(base))
        assert fix in str(error.value) and "\n" not in str(error.value)


QUICKSTART = "recipes/quickstart.yaml"


def test_launch_checks_the_peft_section_against_the_model(tmp_path):
    """`check_before_launch` (before any rank starts): targets that match nothing and an
    adapter folder of another rank are one line each, and nothing is written; a valid
    LoRA recipe passes."""
    from pp_ext.training.preflight import check_before_launch, check_peft

    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("configs/models/quickstart"))
    lora = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"])
    get_peft_model(base, lora).save_pretrained(adapter)
    run = tmp_path / "run"
    for overrides, expected in (
        (["peft.target_modules=[qproj]"], "peft.target_modules ['qproj'] matches no module"),
        ([f"peft.adapter_path={adapter}", "peft.r=4"], "has rank r=2 but the recipe has peft.r=4"),
    ):
        recipe = load(QUICKSTART, [f"output_dir={run}", "peft.type=lora", *overrides])
        assert expected in one_line_error(check_before_launch, recipe, 2)
    assert not run.exists()
    # checked alone: at 2 ranks the layout itself refuses tensor 2 first. Tensor-parallel
    # LoRA runs (tests/lora_tensor_cases.py), but not on an embedding cut by vocabulary
    tensor = [f"output_dir={run}", "peft.type=lora", "parallel.tensor=2"]
    check_peft(load(QUICKSTART, tensor), base.config)
    embedding = load(QUICKSTART, [*tensor, "peft.target_modules=[q_proj,embed_tokens]"])
    expected = (
        "peft.target_modules selects the embedding model.embed_tokens, which parallel.tensor=2"
    )
    assert expected in one_line_error(check_peft, embedding, base.config)
    check_peft(
        load(QUICKSTART, [*tensor[:2], "peft.target_modules=[q_proj,embed_tokens]"]), base.config
    )
    padded = load(
        QUICKSTART,
        [f"output_dir={run}", "peft.type=lora", "parallel.make_vocab_size_divisible_by=64"],
    )
    expected = (
        "the vocabulary of 103 would be padded to 128 rows, which LoRA's adapters cannot hold"
    )
    assert expected in one_line_error(check_before_launch, padded, 2)
    good = [f"output_dir={run}", "peft.type=lora", f"peft.adapter_path={adapter}", "peft.r=2"]
    assert check_before_launch(load(QUICKSTART, good), 2)[0].pipeline == 2
    shipped = load("recipes/quickstart-lora.yaml", [f"output_dir={tmp_path / 'shipped'}"])
    assert check_before_launch(shipped, 2)[0].pipeline == 2


def test_gpt2_s_conv1d_layers_get_fan_in_fan_out_without_a_warning(recipe_file):
    """GPT-2 stores its linear weights [in, out] (Conv1D): the LoraConfig says so, as PEFT
    would set it, so wrapping warns nothing; Linear models keep PEFT's default."""
    import warnings

    section = load(recipe_file, ["peft.type=lora", "peft.target_modules=all-linear"]).peft
    for family, expected in (("gpt2", True), ("llama", False)):
        config = CONFIGS[family](False)
        lora = lora_config(section, config)
        assert lora.fan_in_fan_out is expected
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert target_names(lora, config)


EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
# the MoE families whose experts PEFT's v4-name conversion of all-linear leaves off (read off
# peft.utils.transformers_weight_conversion's table): peft 0.22 added Qwen2-MoE
UNCONVERTED = (
    ("gpt_oss",) if Version(peft.__version__) >= Version("0.22") else ("qwen2_moe", "gpt_oss")
)


@pytest.mark.parametrize("model_type", moe.supported())
def test_moe_stages_hold_the_adapters_peft_saves(model_type):
    """On every MoE family the stages' adapters (fused experts through ParamWrapper,
    nested per parameter; peft's v4-name conversion of all-linear with its doubled rank
    for gate_up_proj) are get_peft_model's: the same keys of adapter_model.safetensors,
    the same shapes."""
    from peft import get_peft_model_state_dict

    from pp_ext.hf import layer_specs
    from pp_ext.peft import Targets, add_adapters, peft_keys
    from pp_ext.peft.config import peft_model_warnings
    from pp_ext.testing.reference import SequentialReference

    config = MOE_CONFIGS[model_type](False)
    for targets, parameters in (("all-linear", EXPERTS), ("all-linear", []), (["o_proj"], EXPERTS)):
        lora = LoraConfig(r=2, target_modules=targets, target_parameters=parameters)
        chain = SequentialReference(layer_specs(config), loss_fn=None)
        layers = add_adapters(list(enumerate(chain.layers)), Targets.of(lora, config), 0)
        ours = {
            key: tuple(dict(layer.named_parameters())[name].shape)
            for layer in layers
            for name, key in peft_keys(layer).items()
        }
        with peft_model_warnings():
            model = get_peft_model(AutoModelForCausalLM.from_config(config), lora)
        theirs = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
        assert ours == theirs, (model_type, targets, parameters)
        experts = any(".experts." in key for key in ours)
        # peft converts all-linear onto the experts of Mixtral, Qwen3-MoE, OLMoE and
        # DeepSeek-V3 (even with target_parameters=[]), not of the UNCONVERTED families:
        # there only target_parameters adapt them
        assert experts == (
            bool(parameters) or targets == "all-linear" and model_type not in UNCONVERTED
        ), experts


def test_moe_targets_that_miss_the_experts_are_refused():
    """target_parameters that match nothing list the 3-D parameters; all-linear (or an
    expert projection's name) that PEFT leaves off the experts (gpt-oss; Qwen2-MoE, which
    peft 0.21 does not convert) is refused unless target_parameters says which ([]: none);
    where peft converts it (Mixtral) the experts are adapted and nothing is refused."""
    shared_expert_only = (  # peft 0.21: Qwen2-MoE's gate_proj is its shared expert's alone
        "set peft.target_parameters=["
        if "qwen2_moe" in UNCONVERTED
        else "PEFT's conversion to this qwen2_moe model's fused experts refuses it"
    )
    cases = [
        ("olmoe", ["q_proj"], ["experts.w1"], "peft.target_parameters ['experts.w1'] matches no"),
        ("gpt_oss", "all-linear", None, "peft.target_modules 'all-linear' adapts no expert"),
        ("qwen2_moe", ["q_proj", "gate_proj"], None, shared_expert_only),
        ("qwen2_moe", ["q_proj"], EXPERTS, "which does not work with lora_dropout != 0: set"),
    ]
    for model_type, targets, parameters, expected in cases:
        config = MOE_CONFIGS[model_type](False)
        dropout = 0.1 if "dropout" in expected else 0.0
        lora = LoraConfig(
            r=2, target_modules=targets, target_parameters=parameters, lora_dropout=dropout
        )
        with pytest.raises(PeftError) as error:
            target_names(lora, config)
            check_experts(lora, config)
        assert expected in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert "(experts.down_proj, experts.gate_up_proj) with its ParamWrapper" in str(error.value)
    for model_type, targets, parameters in (
        ("qwen2_moe", "all-linear", []),
        ("qwen2_moe", "all-linear", EXPERTS),
        ("mixtral", "all-linear", None),
        ("qwen3_moe", ["q_proj", "v_proj"], None),
    ):
        lora = LoraConfig(r=2, target_modules=targets, target_parameters=parameters)
        check_experts(lora, MOE_CONFIGS[model_type](False))


@pytest.mark.parametrize("model_type", moe.supported())
def test_moe_adapters_under_peft_keys_load_in_peft_with_the_stages_logits(model_type, tmp_path):
    """The stages' adapters (random, B too) written under their PEFT keys (what the export
    writes, ``peft_keys``) load with ``PeftModel.from_pretrained`` with no missing or
    unexpected key and give the chained layers' logits (fp32, 1e-5)."""
    import warnings

    from peft import PeftModel
    from safetensors.torch import save_file

    from pp_ext.hf import copy_hf_weights, layer_specs
    from pp_ext.peft import Targets, add_adapters, peft_keys
    from pp_ext.peft.config import peft_model_warnings
    from pp_ext.testing.reference import SequentialReference

    torch.manual_seed(0)
    config = MOE_CONFIGS[model_type](False)
    config.output_router_logits = False  # logits only
    base = AutoModelForCausalLM.from_config(config).float()
    base.save_pretrained(tmp_path / "base")
    lora = LoraConfig(
        r=2,
        target_modules="all-linear",
        target_parameters=EXPERTS,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(tmp_path / "base"),
    )
    chain = SequentialReference(layer_specs(config), loss_fn=None)
    copy_hf_weights(chain.layers, base.state_dict())
    layers = add_adapters(list(enumerate(chain.layers)), Targets.of(lora, config), 0)
    tensors = {
        key: dict(layer.named_parameters())[name].detach().contiguous()
        for layer in layers
        for name, key in peft_keys(layer).items()
    }
    x = torch.randint(100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(x).logits  # before peft wraps base in place
    lora.save_pretrained(tmp_path / "adapter")
    save_file(tensors, tmp_path / "adapter/adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft warns of a missing or unexpected key
        with peft_model_warnings():
            model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = chain(x), model(x).logits
    assert float((ours - theirs).abs().max()) <= 1e-5
    assert float((ours - plain).abs().max()) > 1e-3  # the adapters act
