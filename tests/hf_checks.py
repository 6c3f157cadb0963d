"""Shared by the HF tests: chained layers against HF's model (the tolerance, inputs,
the three logit checks run on built and on loaded layers; an MoE model's router loss
beside its logits), HF-side losses and batches."""

from __future__ import annotations

import re

import torch

import pp_ext.hf.loading as loading
from pp_ext.hf import copy_hf_weights, layer_specs
from pp_ext.testing.reference import SequentialReference

TOL = 1e-5


def hf_layer(name: str, blocks: int) -> int:
    """The pipeline layer of a Llama-like HF model's parameter: embedding, blocks, final
    norm, head."""
    if name.startswith("model.embed_tokens."):
        return 0
    if match := re.match(r"model\.layers\.(\d+)\.", name):
        return int(match.group(1)) + 1
    return blocks + 1 if name.startswith("model.norm.") else blocks + 2


EFFECT = 1e-3  # how far HF's logits must move when a family detail is dropped


def build(specs: list) -> SequentialReference:
    """The layers chained in one process, as one stage after another would run them
    (a tied embedding and head share one module)."""
    return SequentialReference(specs, loss_fn=None)


def pipeline(hf_model, config, attn_implementation: str | None = None):
    chain = build(layer_specs(config, attn_implementation))
    copy_hf_weights(chain.layers, hf_model.state_dict())
    return chain


def ids(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(1, 100, (batch, length), generator=torch.Generator().manual_seed(1))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def logits_and_aux(outputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The last layer's ``logits``, or an MoE model's ``(logits, aux_loss)``."""
    return outputs if isinstance(outputs, tuple) else (outputs, None)


def check_outputs(outputs, hf_outputs, real: torch.Tensor | None = None) -> None:
    """Logits (at the ``real`` positions) and, where HF computes one, the router loss
    (HF's ``aux_loss``: the pipeline must return one exactly then) are HF's."""
    logits, aux = logits_and_aux(outputs)
    real = torch.ones(logits.shape[:-1], dtype=torch.bool) if real is None else real
    assert max_diff(logits[real], hf_outputs.logits[real]) <= TOL
    theirs = getattr(hf_outputs, "aux_loss", None)
    assert (aux is None) == (theirs is None)
    if aux is not None:
        assert max_diff(aux, theirs) <= TOL


@torch.no_grad()
def check_no_padding(hf_model, run) -> None:
    """Plain inputs: the chained layers' logits are HF's."""
    x = ids()
    check_outputs(run(x), hf_model(x))


@torch.no_grad()
def check_padding(hf_model, run, side: str) -> None:
    """One row padded on ``side``: the real positions' logits are HF's (and the router
    loss, which leaves the padding out)."""
    x, mask = ids(), torch.ones(2, 10, dtype=torch.long)
    pad = slice(7, None) if side == "right" else slice(None, 3)
    mask[1, pad] = 0
    check_outputs(run((x, mask)), hf_model(x, attention_mask=mask), mask.bool())


@torch.no_grad()
def check_packed_sequences(hf_model, run) -> None:
    """Two documents in one row: positions restart, no mask; the second document must
    not see the first (checked against running it alone), except in gpt-oss, whose
    ``GptOssModel`` gives its mask functions no position ids: there it sees the first,
    as in HF."""
    x = ids(1, 10)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    outputs = run((x, torch.ones_like(x), positions))
    # HF looks for packed documents only without a KV cache (training), hence use_cache=False
    check_outputs(outputs, hf_model(x, position_ids=positions, use_cache=False))
    ours, _ = logits_and_aux(outputs)
    isolated = hf_model.config.model_type != "gpt_oss"
    assert (max_diff(ours[:, 6:], hf_model(x[:, 6:]).logits) <= TOL) == isolated


def layers_by_hf_key(layers) -> dict[str, torch.Tensor]:
    """The tensors of pipeline ``layers`` under their HF names."""
    return {
        hf: layer.state_dict()[local] for layer in layers for local, hf in layer.hf_keys().items()
    }


def by_hf_key(module) -> dict[str, torch.Tensor]:
    """The module's tensors under their HF names."""
    return layers_by_hf_key(loading.local_layers(module))


def shifted_loss(logits, labels):
    import torch.nn.functional as F

    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100
    )


def batch(step: int, micro_batch: int):
    import torch

    ids = torch.randint(
        100, (2, 10), generator=torch.Generator().manual_seed(100 * step + micro_batch)
    )
    # HF shifts labels inside the model; a pipeline's last stage gets them shifted
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    return ids, labels


# E2M1, the 4-bit element of the OCP Microscaling (MX) formats, by its 4-bit code
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP4 = torch.cat([FP4, -FP4])
MXFP4_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gpt-oss's stacked expert ``weight`` (experts, in, out) as the hub stores it in MXFP4:
    per output row, blocks of 32 inputs share a power-of-two scale (the smallest that
    brings the block's largest value within E2M1's 6) and each value is rounded to the
    nearest E2M1 code, two codes a byte, the even one low. Returns ``(blocks (experts,
    out, in / 32, 16) uint8, scales (experts, out, in / 32) uint8, biased by 127, the
    weight those codes stand for)``."""
    rows = weight.detach().float().transpose(1, 2)
    experts, out, inputs = rows.shape
    groups = rows.reshape(experts, out, inputs // 32, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1) / 6)).clamp(-127, 127)
    scale = torch.exp2(exponent).unsqueeze(-1)
    codes = (groups.unsqueeze(-1) / scale.unsqueeze(-1) - FP4).abs().argmin(-1)
    blocks = (codes[..., 0::2] | codes[..., 1::2] << 4).to(torch.uint8)
    values = (FP4[codes] * scale).reshape(experts, out, inputs).transpose(1, 2)
    return blocks, (exponent + 127).to(torch.uint8), values


def save_mxfp4(model, folder, max_shard_size: str = "20KB") -> dict[str, torch.Tensor]:
    """``model`` (gpt-oss) saved as the hub's checkpoints are: its experts' weights MXFP4
    ``*_blocks`` / ``*_scales`` (:func:`mxfp4`), everything else as is, config.json with
    the hub's ``quantization_config``. Returns the expert weights the codes stand for."""
    import json
    from pathlib import Path

    from huggingface_hub import save_torch_state_dict

    folder = Path(folder)
    model.save_pretrained(folder)  # config and generation config
    for stale in folder.glob("*.safetensors"):
        stale.unlink()
    tensors, values = {}, {}
    for key, tensor in model.state_dict().items():
        if key.endswith(MXFP4_EXPERTS):
            tensors[f"{key}_blocks"], tensors[f"{key}_scales"], values[key] = mxfp4(tensor)
        else:
            tensors[key] = tensor.detach().contiguous()
    save_torch_state_dict(tensors, folder, max_shard_size=max_shard_size)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return values
