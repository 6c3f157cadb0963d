#!/usr/bin/env bash
# The one-GPU check of issue 16, in one command (about 5 minutes on an H200; each stage has a
# time limit, 180 + 90 + 180 + 240 + 200 s at most), on a machine with 2 GPUs the LoRA bench of
# issue 23, and the MoE bench of issue 24 (its pipeline 2 x expert 2 row with 4 GPUs).
#
# On a machine with one GPU (or two), from the repository root, after the device kit:
#   source .device-kit/setup.sh && OUT=/some/folder bash launch/gpu_check.sh
# It writes under $OUT (default runs/gpu-check; 11 files, no sub-folders) and prints a
# summary table last:
#   1. bench-308m.{txt,json}: `pp-ext bench --model configs/models/llama-308m` at the
#      issue's settings: 16 layers, hidden 1024, vocabulary 32000; micro-batches of
#      4 x 2048 tokens, 4 per step; bf16 + ZeRO-1 (fp32 accumulation), torch AdamW;
#      tokens/s median of steps 4-12 of DeepSpeed's engine on transformers' model and of
#      pp-ext at pipeline 1 (1f1b, zb-h1); per-layer F, I, W, B at that shape;
#   2. layer-8b.{txt,json}: per-layer F, I, W, B at the Llama-3.1-8B shape, 4096 tokens;
#   3. moe.{txt,json}: `pp-ext bench --model configs/models/qwen3-30b-a3b --layers 1`: one
#      Qwen3-30B-A3B MoE layer (128 experts, 8 per token, its 151936 vocabulary), micro-batches
#      of 2 x 2048 tokens, 4 per step, bf16 + ZeRO-1: tokens/s of DeepSpeed's engine on
#      transformers' model and of pp-ext 1f1b at pipeline 1, per-layer F, I, W, B; with 4 GPUs
#      2 layers, with pp-ext at pipeline 2 x data 2 x expert 2 (--expert 2) beside, its losses
#      next to pipeline 1's;
#   4. lora.{txt,json}: `pp-ext bench --lora` on 2 GPUs (skipped, said in lora.txt, with
#      fewer): LoRA r=16 all-linear on the 308M model, bf16, micro-batches of 4 x 2048
#      tokens, 8 per step; pp-ext pipeline 2 (1f1b, zb-h1, zbv) next to DeepSpeed ZeRO-3 +
#      peft over 2 data ranks: tokens/s, losses, tokens per step, memory per rank;
#   5. smoke.log: the GPU smoke suite's single-GPU cases (tests/test_gpu_smoke.py);
#   bench.log: the benches' stderr; summary.txt: the table printed last, with the
#   issue's bars (pp-ext 1f1b >= 0.97x DeepSpeed's engine, zb-h1 >= 0.98x 1f1b,
#   decoder-layer forward within 5 % of transformers').
# The benches run first, so a smoke case that hangs costs its timeout, not the figures.
#
# PP_EXT_GPU_CHECK_TINY=1 runs the same steps on the CPU at toy sizes (the smoke
# model, a few tokens), to check the script itself where there is no GPU:
#   PP_EXT_GPU_CHECK_TINY=1 PYTHON=.venv/bin/python OUT=/tmp/gpu-check bash launch/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${PYTHON:-python3}
out=${OUT:-runs/gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if [ "${PP_EXT_GPU_CHECK_TINY:-0}" = 1 ]; then
    device=cpu
    big=(--model configs/models/smoke --layers 2 --seq 16 --micro-batch-size 2 --micro-batches 4 --steps 4
         --warmup 1 --repeats 2)
    layer=(--model configs/models/smoke --layers 1 --seq 32 --micro-batch-size 1 --steps 0 --repeats 2)
    moe=(--model configs/models/smoke-moe --layers 2 --seq 16 --micro-batch-size 2 --micro-batches 4 --steps 2
         --warmup 1 --repeats 1 --schedules 1f1b --dtype float32)
    lora=(model.path=configs/models/smoke train.micro_batch_size=2 data.seq_len=16 --schedules 1f1b --warmup 0 --repeats 1)
else
    device=cuda
    big=(--model configs/models/llama-308m --seq 2048 --micro-batch-size 4 --micro-batches 4 --steps 12 --warmup 3
         --repeats 20)
    layer=(--model configs/models/llama-3.1-8b --layers 1 --seq 4096 --micro-batch-size 1 --steps 0 --repeats 20)
    moe=(--model configs/models/qwen3-30b-a3b --layers 1 --seq 2048 --micro-batch-size 2 --micro-batches 4 --steps 12
         --warmup 3 --repeats 20 --schedules 1f1b)
    lora=(model.path=configs/models/llama-308m model.dtype=bfloat16 'deepspeed.bases=[zero1-bf16]' peft.r=16
          peft.lora_alpha=32 train.micro_batch_size=4 data.seq_len=2048 parallel.micro_batches=8 --warmup 3 --repeats 10)
fi
# the LoRA bench's 2 ranks: one GPU each, or CPU threads (the toy run)
gpus=$("$py" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

exec 3>&2  # the terminal's stderr: the stages' own output goes to files
stage() {  # stage NAME SECONDS COMMAND...: run it with a time limit, say how it ended
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "gpu_check: $name ..." >&3
    timeout --kill-after=10 "$limit" "$@"
    local code=$?
    echo "gpu_check: $name: exit $code after $((SECONDS - start)) s" | tee -a "$out/bench.log" >&3
    return $code
}

: > "$out/bench.log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"; } >> "$out/bench.log" 2>&1

stage "bench 308M (tokens/s, layer)" 180 "$py" -m pp_ext.cli bench --device "$device" "${big[@]}" \
    --save "$out/bench-308m.json" > "$out/bench-308m.txt" 2>> "$out/bench.log"
stage "layer at the 8B shape" 90 "$py" -m pp_ext.cli bench --device "$device" "${layer[@]}" \
    --save "$out/layer-8b.json" > "$out/layer-8b.txt" 2>> "$out/bench.log"
# the MoE bench's pipeline 2 x data 2 x expert 2 row: 4 ranks, one GPU each, or CPU threads
# (on the GPUs 2 layers: an MoE layer on each stage)
if [ "$device" = cpu ]; then
    moe+=(--expert 2)
elif [ "$gpus" -ge 4 ]; then
    moe+=(--expert 2 --layers 2)
fi
stage "MoE: pipeline 1 (and 2 x expert 2) vs DeepSpeed" 180 "$py" -m pp_ext.cli bench --device "$device" \
    "${moe[@]}" --save "$out/moe.json" > "$out/moe.txt" 2>> "$out/bench.log"
if [ "$device" = cpu ] || [ "$gpus" -ge 2 ]; then
    stage "LoRA: pipeline 2 vs ZeRO-3 + peft" 240 "$py" -m pp_ext.cli bench --lora recipes/quickstart.yaml \
        peft.type=lora peft.target_modules=all-linear "${lora[@]}" --save "$out/lora.json" > "$out/lora.txt" \
        2>> "$out/bench.log"
else
    echo "LoRA bench skipped: it starts 2 ranks, one GPU each, and $gpus is visible" | tee "$out/lora.txt" >&3
fi
stage "smoke suite, single-GPU cases" 200 "$py" -m pytest tests/test_gpu_smoke.py -k single-gpu -q \
    -p no:cacheprovider > "$out/smoke.log" 2>&1

"$py" - "$out" <<'PY' | tee "$out/summary.txt"
"""The issue's figures and bars, from the two reports and the smoke log."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


def verdict(ok):
    return "ok" if ok else "MISSED"


lines = []
bench, layer8b = load("bench-308m.json"), load("layer-8b.json")
if bench is None:
    lines.append("bench 308M: no report (see bench.log)")
else:
    rows = {row["engine"]: row for row in bench["steps"]}
    ds, one, zb = rows["deepspeed (HF model)"], rows["pp-ext 1f1b"], rows["pp-ext zb-h1"]
    lines.append(f"train step, {bench['model_type']} {bench['decoder_layers']} layers, {bench['device']}")
    lines.append(f"{'engine':<22}{'tokens/s':>11}{'ratio':>8}  bar     reads syncs")
    lines.append(f"{'deepspeed (HF model)':<22}{ds['tokens_per_s']:>11.0f}{1:>8.3f}  -       "
                 f"{ds['host_reads']:>5} {ds['synchronizations']:>5}")
    lines.append(f"{'pp-ext 1f1b':<22}{one['tokens_per_s']:>11.0f}{one['vs_deepspeed']:>8.3f}  >=0.97 "
                 f"{verdict(one['vs_deepspeed'] >= 0.97):<7}{one['host_reads']:>5} {one['synchronizations']:>5}")
    lines.append(f"{'pp-ext zb-h1 / 1f1b':<22}{zb['tokens_per_s']:>11.0f}{zb['vs_1f1b']:>8.3f}  >=0.98 "
                 f"{verdict(zb['vs_1f1b'] >= 0.98):<7}{zb['host_reads']:>5} {zb['synchronizations']:>5}")
    lines.append(f"first losses: DS {ds['first_loss']:.4f}, 1f1b {one['first_loss']:.4f}, zb-h1 {zb['first_loss']:.4f}")
for name, report in (("308M", bench), ("8B shape", layer8b)):
    if report is None:
        lines.append(f"layer {name}: no report")
        continue
    lay, ours = report["layer"], report["layer"]["pp_ext"]
    lines.append(f"layer {name} ({lay['tokens']} tokens): F {ours['forward'] * 1e3:.3f} ms vs transformers "
                 f"{lay['transformers']['forward'] * 1e3:.3f} ms = {lay['forward_ratio']:.3f} (<=1.05 "
                 f"{verdict(lay['forward_ratio'] <= 1.05)}); B {lay['backward_ratio']:.3f}; I {ours['input_grad'] * 1e3:.3f} "
                 f"W {ours['weight_grad'] * 1e3:.3f} B {ours['backward'] * 1e3:.3f} ms, I+W = {lay['split_ratio']:.3f} B; "
                 f"first in chunk {ours['forward_first_in_chunk'] * 1e3:.3f} ms")
moe = load("moe.json")
if moe is None:
    lines.append("MoE bench: no report (see bench.log)")
else:
    rows = moe["steps"]
    lines.append(f"MoE train step, {moe['model_type']} {moe['decoder_layers']} layer(s), {moe['device']}")
    lines.append(f"{'engine':<22}{'tokens/s':>11}{'vs DS':>8}{'loss 1st':>10}{'last':>8}")
    for row in rows:
        lines.append(f"{row['engine']:<22}{row['tokens_per_s']:>11.0f}{row['vs_deepspeed']:>8.3f}"
                     f"{row['losses'][0]:>10.4f}{row['losses'][-1]:>8.4f}")
    for row in rows:
        if "ranks" in row:
            lines.append(f"MoE {row['ranks']}: losses within {row['loss_vs_pipeline_1']:.1e} of pipeline 1's")
    if not any("ranks" in row for row in rows):
        lines.append("MoE pipeline 2 x expert 2 row skipped: it starts 4 ranks, one GPU each")
lora = load("lora.json")
if lora is None:
    lines.append("LoRA bench: " + ((out / "lora.txt").read_text().strip() or "no report (see bench.log)"))
else:
    rows = lora["rows"]
    lines.append(f"LoRA r={lora['lora']['r']} {lora['lora']['target_modules']}, {lora['model_type']} "
                 f"{lora['decoder_layers']} layers, {lora['dtype']}, {lora['device']}")
    lines.append(f"{'engine':<16}{'tokens/s':>11}{'vs ZeRO-3':>10}{'tokens':>9}{'loss 1st':>10}{'last':>8}"
                 f"{'peak MiB (max rank)':>21}")
    for row in rows:
        peak = max(sum(held[k] for k in ("weights", "gradients", "optimizer", "activations"))
                   for held in row["memory"]) / 2**20
        lines.append(f"{row['engine']:<16}{row['tokens_per_s']:>11.0f}{row['vs_zero3']:>10.3f}"
                     f"{row['tokens_per_step']:>9}{row['losses'][0]:>10.4f}{row['losses'][-1]:>8.4f}{peak:>21.1f}")
    same = len({(row["tokens_per_step"], row["batch_digest"], row["trainable"]) for row in rows}) == 1
    close = all(abs(row["losses"][0] - rows[-1]["losses"][0]) <= 1e-2 * abs(rows[-1]["losses"][0]) for row in rows)
    lines.append(f"LoRA: same tokens, batch and trainable parameters on every row {verdict(same)}; "
                 f"first losses within 1 % of ZeRO-3's {verdict(close)}")
smoke = (out / "smoke.log").read_text().splitlines() if (out / "smoke.log").is_file() else []
ends = [line.strip("= ") for line in smoke if any(w in line for w in (" passed", " failed", " skipped", " error"))]
lines.append("smoke (single GPU): " + (ends[-1] if ends else "no result (see smoke.log)"))
print("\n".join(lines))
PY
