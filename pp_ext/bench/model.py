"""``pp-ext bench --model``: on one device, pp-ext's decoder layer and train step next to
transformers' own, under the same DeepSpeed configuration.

What a user with one GPU (or a pipeline of one stage per node) asks first: does a
pp-ext stage cost what the Hugging Face model costs, and what does a W-split schedule
(Qi et al. 2024, "Zero Bubble Pipeline Parallelism") cost where there is no bubble to
fill? One process on one device answers both, in one run:

* per decoder layer, median F, I, W and fused B seconds of pp-ext's layer
  (:class:`pp_ext.hf.common.HFDecoderLayer`) next to F and B of transformers' own
  decoder layer with the same weights, called as the HF model calls it (mask and rotary
  table built beforehand, once). pp-ext's F is timed as a chunk's later layers run
  (the chunk's context built), and once more as its first decoder layer runs (building
  the masks and rotary tables, with the one host read of the batch's layout); I and W
  on a copy whose linear layers defer their weight GEMMs (:mod:`pp_ext.autograd.split_backward`);
* per train step, tokens per second of DeepSpeed's ordinary engine
  (``deepspeed.initialize``) on transformers' ``AutoModelForCausalLM`` and of pp-ext's
  engine at pipeline 1 for each schedule, from the same weights, data, DeepSpeed
  configuration (the training job's ``zero1-bf16`` base: bf16, ZeRO-1, fp32 gradient
  accumulation; gradient clipping) and torch AdamW. The engines are built first and
  stepped round-robin, in a new order each round, so drift in the machine falls on all
  alike; the first ``warmup`` rounds are left out of the medians (steps 4-12 of 12 by
  default). The first step's losses are reported too: the same model on the same
  data, they agree within bf16's rounding;
* per train step, what each engine asks of the host, counted in one more step under a
  TorchDispatchMode: host reads (``.item()``, ``bool(tensor)``, ``nonzero`` ... each
  waits for the device's queue to drain), device synchronisations, and aten ops (about
  one kernel launch each). Counts do not depend on the device, so a CPU run shows what
  a GPU run pays; and its memory: on CUDA the peak allocated during the step above what
  was allocated at its start (activations, gradients being formed, temporaries), on CPU
  the peak bytes alive of what autograd saves for backward (:class:`pp_ext.bench.lora.SavedBytes`).

A mixture-of-experts model (:mod:`pp_ext.hf.moe`) runs the same way: both sides use
transformers' ``grouped_mm`` experts, and with ``output_router_logits`` both add
``router_aux_loss_coef`` times the load-balancing loss to the LM loss (HF's model
itself, pp-ext's :class:`~pp_ext.training.loss.LanguageModelLoss`); the decoder layer
timed is one MoE layer, its stream carrying the router statistics. With ``expert`` E > 1
one more row (:func:`expert_steps`): pp-ext at pipeline 2 x data E x expert E on 2 E
ranks, the same tokens per step, its losses next to pipeline 1's.

Ratios are pp-ext / transformers for the layer (time) and pp-ext / DeepSpeed's engine
for the step (tokens/s), both medians of the same run.
"""

from __future__ import annotations

import copy
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from pp_ext.autograd.split_backward import WeightGradStore, enable_split_backward
from pp_ext.bench.lora import step_peak
from pp_ext.bench.measure import median_time, time_passes
from pp_ext.config.recipe import DEEPSPEED_BASES, batch_config
from pp_ext.data import IGNORE_INDEX
from pp_ext.engine.boundary import ignore_deepspeed_deprecations
from pp_ext.engine.initialize import initialize
from pp_ext.hf import build_pipeline_module, copy_hf_weights, layer_specs, router_loss_coef
from pp_ext.hf.common import HFDecoderLayer
from pp_ext.hf.context import ChunkContext
from pp_ext.hf.loading import default_dtype, load_config, local_layers
from pp_ext.hf.moe import FAMILIES as MOE_FAMILIES
from pp_ext.hf.moe import RouterDecoderLayer
from pp_ext.moe.router_loss import empty_statistics
from pp_ext.schedules import get
from pp_ext.testing.spawn import spawn
from pp_ext.training.loss import LanguageModelLoss
from pp_ext.training.optim import expert_groups

BASELINE = "deepspeed (HF model)"


@dataclass(frozen=True)
class ModelBenchOptions:
    model: str  # an HF model folder; its config.json is read, weights are not
    device: str = ""  # "cuda" or "cpu"; empty: cuda where there is one
    layers: int = 0  # decoder layers (0: the config's)
    micro_batch_size: int = 4
    seq: int = 2048
    micro_batches: int = 4
    steps: int = 12  # rounds of train steps (0: per-layer timings only)
    warmup: int = 3  # first rounds left out of the medians
    schedules: tuple[str, ...] = ("1f1b", "zb-h1")
    expert: int = 1  # > 1: also the row of pipeline 2 x data E x expert E (2 E ranks)
    layer_repeats: int = 20
    dtype: str = "bfloat16"
    attn_implementation: str | None = None
    grad_clip: float = 1.0
    lr: float = 1e-5
    seed: int = 1234

    def check(self) -> None:
        """One ValueError line for what cannot run (before any process starts)."""
        if self.steps and self.steps <= self.warmup:
            raise ValueError(
                f"--steps {self.steps} leaves nothing to time after --warmup {self.warmup}: "
                f"give more steps than warm-up rounds (or --steps 0 for the per-layer timings only)"
            )
        for name in self.schedules:
            get(name)
        if self.expert > 1:
            if not self.steps:
                raise ValueError(
                    f"--expert {self.expert} adds a train-step row: give --steps above --warmup"
                )
            if self.micro_batches % self.expert:
                raise ValueError(
                    f"--expert {self.expert} splits the {self.micro_batches} micro-batches over "
                    f"{self.expert} data ranks: give --micro-batches a multiple of {self.expert}"
                )

    def check_model(self, config) -> None:
        """One ValueError line for an expert row the model cannot run."""
        if self.expert == 1:
            return
        moe = MOE_FAMILIES.get(config.model_type)
        if moe is None:
            raise ValueError(
                f"--expert {self.expert}: {self.model} is a dense {config.model_type!r} model "
                f"without routed experts: drop --expert, or give an MoE model"
            )
        if (experts := moe.num_experts(config)) % self.expert:
            raise ValueError(
                f"--expert {self.expert} does not divide the {experts} routed experts of "
                f"{self.model}: give a divisor of {experts}"
            )


def bench_config(options: ModelBenchOptions):
    """The model's config with ``layers`` decoder layers (per-layer lists such as
    ``layer_types`` cut to match)."""
    config = copy.deepcopy(load_config(options.model))
    if options.layers:
        config.num_hidden_layers = options.layers
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types[: options.layers])
    return config


# --------------------------------------------------------------------------- counting


class StepCounts:
    """Counts host reads, aten ops and device synchronisations while active."""

    READS = {
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "equal",
        "is_nonzero",
        "unique_consecutive",
        "_unique2",
        "unique_dim",
        "repeat_interleave",
    }
    COPIES = {"tolist", "numpy", "cpu"}  # on a CPU tensor these read the host with no aten op

    def __init__(self) -> None:
        self.ops = self.reads = self.syncs = self._depth = 0

    def __enter__(self):
        counts = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts.ops += 1
                counts.reads += func.overloadpacket.__name__ in StepCounts.READS
                return func(*args, **(kwargs or {}))

        class Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                counts.reads += getattr(func, "__name__", "") in StepCounts.COPIES
                return func(*args, **(kwargs or {}))

        accelerator = get_accelerator()
        self._restore = [
            (accelerator, "synchronize", accelerator.synchronize),
            (torch.cuda, "synchronize", torch.cuda.synchronize),
        ]
        for owner, name, function in self._restore:
            setattr(owner, name, self._counting(function))
        self._modes = [Function(), Dispatch()]
        for mode in self._modes:
            mode.__enter__()
        return self

    def _counting(self, function):
        def synchronize(*args, **kwargs):
            # DeepSpeed's accelerator synchronises through torch.cuda's: one, not two
            self.syncs += self._depth == 0
            self._depth += 1
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1

        return synchronize

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        for owner, name, function in self._restore:
            setattr(owner, name, function)

    def as_dict(self) -> dict:
        return {"host_reads": self.reads, "synchronizations": self.syncs, "aten_ops": self.ops}


# --------------------------------------------------------------------------- the engines


def deepspeed_config(options: ModelBenchOptions, data: int = 1) -> dict:
    """The training job's ``zero1-bf16`` base (fp32 ones for ``float32``) with the bench's
    sizes: its micro-batches shared by ``data`` data ranks (the same tokens per step)."""
    base = "zero1-bf16" if options.dtype == "bfloat16" else "zero1-fp32"
    config = json.loads((DEEPSPEED_BASES / f"{base}.json").read_text())
    config.update(
        batch_config(options.micro_batch_size, options.micro_batches // data, data),
        gradient_clipping=options.grad_clip,
        steps_per_print=10**9,
    )
    return config


def batches(options: ModelBenchOptions, vocab: int):
    """``micro_batches`` pairs of (token ids, labels shifted by one; the last position
    unlabelled), the same every step: pp-ext's loss reads labels shifted, HF's model
    shifts the ids itself, so both score the same tokens."""
    gen = torch.Generator().manual_seed(options.seed)
    out = []
    for _ in range(options.micro_batches):
        ids = torch.randint(vocab, (options.micro_batch_size, options.seq), generator=gen)
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def hf_model(config, options: ModelBenchOptions, device):
    """Transformers' model of ``config``, initialised as HF does under ``options.seed``."""
    torch.manual_seed(options.seed)
    kwargs = (
        {"attn_implementation": options.attn_implementation} if options.attn_implementation else {}
    )
    if config.model_type in MOE_FAMILIES:  # the experts pp-ext's layers use (pp_ext.hf.moe)
        kwargs["experts_implementation"] = "grouped_mm"
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, options.dtype), **kwargs)
    return model.to(device).train()


def deepspeed_engine(model, options: ModelBenchOptions):
    """DeepSpeed's ordinary engine on the HF model and a step function."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(options)
    )
    device = engine.device

    def step(data):
        """One optimizer step over ``data``; the mean loss of its micro-batches, as
        pp-ext's ``train_batch`` returns it."""
        total = 0.0
        for ids, labels in data:
            # HF labels are the ids (the model shifts them); no KV cache in training
            ids = ids.to(device)
            loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
            engine.backward(loss)
            engine.step()
            total = total + loss.detach()
        return total / len(data)

    return engine, step


def pp_ext_engine(config, state_dict, schedule: str, options: ModelBenchOptions, expert: int = 1):
    """pp-ext's engine on ``config``'s layers holding ``state_dict`` (the HF model's
    weights), and a step function: at pipeline 1, or with ``expert`` > 1 at pipeline 2 x
    data ``expert`` x expert ``expert`` (each rank holding its experts)."""
    spec = get(schedule)
    loss = LanguageModelLoss(router_loss_coef(config))
    layout = (
        {"num_stages": 1}
        if expert == 1
        else {
            "topology": PipeModelDataParallelTopology(2, 1, expert),
            "expert": expert,
        }
    )
    module = build_pipeline_module(
        config,
        **layout,
        chunks=spec.default_chunks,
        placement=spec.placement,
        partition_method="uniform",
        loss_fn=loss,
        dtype=options.dtype,
        attn_implementation=options.attn_implementation,
        seed=options.seed,
    )
    copy_hf_weights(local_layers(module), state_dict)
    # ZeRO partitions expert parameters in groups of their own (DeepSpeed-MoE's), as training
    params = expert_groups([{"params": list(module.parameters()), "name": "dense"}])
    optimizer = torch.optim.AdamW(params, lr=options.lr)
    engine, *_ = initialize(
        model=module,
        optimizer=optimizer,
        config=deepspeed_config(options, data=expert),
        schedule=schedule,
    )
    return engine, lambda data: engine.train_batch(iter(data))


def initial_state(config, options: ModelBenchOptions, device) -> tuple:
    """The HF model and a CPU copy of its initial weights."""
    model = hf_model(config, options, device)
    return model, {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}


def build_engines(config, options: ModelBenchOptions, device) -> dict:
    """{name: (engine, step)}: DeepSpeed's engine on the HF model first, then pp-ext's
    for each schedule, all from the HF model's initial weights."""
    model, state = initial_state(config, options, device)
    engines = {BASELINE: deepspeed_engine(model, options)}
    for schedule in options.schedules:
        engines[f"pp-ext {schedule}"] = pp_ext_engine(config, state, schedule, options)
    return engines


def count_step(step, data) -> dict:
    """Host reads, synchronisations and aten ops of one train step."""
    with StepCounts() as counts:
        step(data)
    return counts.as_dict()


def train_steps(config, options: ModelBenchOptions, device) -> list[dict]:
    """One row per engine: tokens/s median over the timed rounds, step times, each
    step's loss and the counts and peak memory of one more step."""
    sync = device_sync(device)
    engines = build_engines(config, options, device)
    data = batches(options, config.vocab_size)
    times: dict[str, list[float]] = {name: [] for name in engines}
    losses: dict[str, list[float]] = {name: [] for name in engines}
    order, shuffle = list(engines), random.Random(options.seed).shuffle
    for _ in range(options.steps):
        shuffle(order)
        for name in order:
            sync()
            start = time.perf_counter()
            loss = engines[name][1](data)
            sync()
            times[name].append(time.perf_counter() - start)
            losses[name].append(float(loss))
    tokens = tokens_per_step(options)
    rows = []
    for name, (engine, step) in engines.items():
        timed = times[name][options.warmup :]
        rows.append(
            {
                "engine": name,
                "tokens_per_s": tokens / statistics.median(timed),
                "step_time_s": statistics.median(timed),
                "step_times_s": times[name],
                "first_loss": losses[name][0],
                "losses": losses[name],
                **count_step(step, data),
                "peak_step_mib": step_peak(lambda: step(data), device)[1] / 2**20,
            }
        )
    return rows


def ratios(rows: list[dict]) -> None:
    """Each row's tokens/s over DeepSpeed's (the first row) and pp-ext's rows' over pp-ext
    1f1b's at pipeline 1; an expert row's largest loss difference from its schedule's
    pipeline-1 row."""
    base = rows[0]["tokens_per_s"]
    by_name = {row["engine"]: row for row in rows}
    one_f_one_b = by_name.get("pp-ext 1f1b", {}).get("tokens_per_s")
    for row in rows:
        row["vs_deepspeed"] = row["tokens_per_s"] / base
        if one_f_one_b is not None and row["engine"].startswith("pp-ext"):
            row["vs_1f1b"] = row["tokens_per_s"] / one_f_one_b
        if "ranks" in row:
            pipeline_1 = by_name[row["engine"].rsplit(" p2 ", 1)[0]]["losses"]
            row["loss_vs_pipeline_1"] = max(
                abs(a - b) for a, b in zip(row["losses"], pipeline_1, strict=True)
            )


def expert_steps(rank: int, world: int, options: ModelBenchOptions) -> dict | None:
    """The row of pp-ext at pipeline 2 x data E x expert E (``options.expert``; 2 E ranks,
    the first schedule), from the HF model's same initial weights (each rank builds them
    under the seed and keeps its layers and experts) on the same micro-batches, E data
    ranks taking every E-th: the same tokens per step, so its tokens/s and losses stand
    beside the pipeline-1 rows. A step's time is the slowest rank's."""
    ignore_deepspeed_deprecations()  # ZeRO over 2 or more data ranks
    device = bench_device(options)
    config = bench_config(options)
    _, state = initial_state(config, options, device)
    schedule, sync = options.schedules[0], device_sync(device)
    engine, step = pp_ext_engine(config, state, schedule, options, expert=options.expert)
    del state
    data = batches(options, config.vocab_size)[
        engine.grid.get_data_parallel_rank() :: options.expert
    ]
    times, losses = [], []
    for _ in range(options.steps):
        dist.barrier()
        start = time.perf_counter()
        losses.append(float(step(data)))  # every rank's: the mean over all data ranks
        sync()
        elapsed = torch.tensor([time.perf_counter() - start], device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(float(elapsed))
    if rank:
        return None
    timed = times[options.warmup :]
    return {
        "engine": f"pp-ext {schedule} p2 e{options.expert}",
        "ranks": f"pipe 2 x data {options.expert} x expert {options.expert}",
        "tokens_per_s": tokens_per_step(options) / statistics.median(timed),
        "step_time_s": statistics.median(timed),
        "step_times_s": times,
        "first_loss": losses[0],
        "losses": losses,
    }


def tokens_per_step(options: ModelBenchOptions) -> int:
    return options.micro_batch_size * options.seq * options.micro_batches


def device_sync(device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# --------------------------------------------------------------------------- one layer


def layer_timings(config, options: ModelBenchOptions, device) -> dict:
    """Median seconds of one decoder layer's passes, pp-ext's next to transformers'."""
    dtype = getattr(torch, options.dtype)
    # the first MoE layer of an MoE model (Qwen3-MoE's first layers may be dense)
    decoders = [
        s
        for s in layer_specs(config, options.attn_implementation)
        if isinstance(s.typename, type) and issubclass(s.typename, HFDecoderLayer)
    ]
    moe = MOE_FAMILIES.get(config.model_type)
    spec = next(
        (s for i, s in enumerate(decoders) if moe is None or moe.sparse(config, i)), decoders[0]
    )
    torch.manual_seed(options.seed)
    with default_dtype(
        dtype
    ):  # as the engine builds layers: HF's float32 buffers (rotary inv_freq) stay so
        ours = spec.build().to(device)
    theirs = copy.deepcopy(ours.layer)  # transformers' own decoder layer, the same weights
    split, store = copy.deepcopy(ours), WeightGradStore()
    enable_split_backward(split, store)
    shape = (options.micro_batch_size, options.seq)
    x = (torch.randn(*shape, config.hidden_size, device=device, dtype=dtype) * 0.1).requires_grad_()
    positions = torch.arange(options.seq, device=device).expand(*shape)
    padding = torch.ones(shape, dtype=torch.long, device=device)
    context = ChunkContext(positions, padding)
    # the router statistics an MoE layer adds to, riding after the int tensors (pp_ext.hf.moe)
    stats = (
        empty_statistics(moe.num_experts(config), device)
        if issubclass(spec.typename, RouterDecoderLayer) and moe
        else ()
    )
    # what transformers' model passes its layers: the mask and the rotary table, built once
    kwargs = {
        "attention_mask": context.mask(ours.make_mask, ours.config, x),
        "position_ids": positions,
    }
    if ours.rotary_emb is not None:
        kwargs["position_embeddings"] = context.rotary(ours.rotary_emb, x, ours.rope_kwargs)
    sync = device_sync(device)

    def timed(forward):
        def run():
            out = forward()
            sync()
            return out

        return run

    def backward(out):
        out.backward(torch.ones_like(out))
        sync()

    repeats = options.layer_repeats
    hf_f, _, _, hf_b = time_passes(
        timed(lambda: theirs(x, **kwargs)), backward, WeightGradStore(), repeats, sync
    )
    f, _, _, b = time_passes(
        timed(lambda: ours((x, positions, padding, *stats, context))[0]),
        backward,
        WeightGradStore(),
        repeats,
        sync,
    )
    split_f, i, w, _ = time_passes(
        timed(lambda: split((x, positions, padding, *stats, context))[0]),
        backward,
        store,
        repeats,
        sync,
    )
    first = median_time(timed(lambda: ours((x, positions, padding, *stats))[0]), repeats)
    build = median_time(timed(lambda: _build(ChunkContext(positions, padding), ours, x)), repeats)
    return {
        "layer": type(theirs).__name__,
        "tokens": options.micro_batch_size * options.seq,
        "transformers": {"forward": hf_f, "backward": hf_b},
        "pp_ext": {
            "forward": f,
            "forward_first_in_chunk": first,
            "context_build": build,
            "forward_split": split_f,
            "input_grad": i,
            "weight_grad": w,
            "backward": b,
        },
        "forward_ratio": f / hf_f,
        "backward_ratio": b / hf_b,
        "split_ratio": (i + w) / b,
    }


def _build(context, layer, hidden):
    mask = context.mask(layer.make_mask, layer.config, hidden)
    return mask, None if layer.rotary_emb is None else context.rotary(
        layer.rotary_emb, hidden, layer.rope_kwargs
    )


# --------------------------------------------------------------------------- run


def describe(device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def bench_device(options: ModelBenchOptions) -> torch.device:
    return torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def worker(rank: int, world: int, options: ModelBenchOptions) -> dict:
    device = bench_device(options)
    config = bench_config(options)
    report = {
        "options": {**asdict(options), "schedules": list(options.schedules)},
        "device": describe(device),
        "model_type": config.model_type,
        "decoder_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "torch": torch.__version__,
    }
    report["layer"] = layer_timings(config, options, device)
    if options.steps:
        report["steps"] = train_steps(config, options, device)
    return report


def run(options: ModelBenchOptions) -> dict:
    """The report of one run, in a process of its own (a world of one rank)."""
    options.check()
    # a missing folder, an unknown model, an expert row it cannot run: here, in this process
    options.check_model(bench_config(options))
    report = spawn(worker, 1, options)[0]
    if "steps" in report:
        if options.expert > 1:  # its ranks after the one-device run: no engine shares a core
            report["steps"].append(spawn(expert_steps, 2 * options.expert, options)[0])
        ratios(report["steps"])
    return report


def format_report(report: dict) -> str:
    """The report as plain-text tables."""
    opts, layer = report["options"], report["layer"]
    ms = 1e3
    lines = [
        f"{report['model_type']}: {report['decoder_layers']} decoder layers, hidden {report['hidden_size']}, "
        f"vocabulary {report['vocab_size']}, {opts['dtype']} on {report['device']}",
        "",
        f"one decoder layer ({layer['layer']}), {layer['tokens']} tokens, median of {opts['layer_repeats']} (ms)",
        f"{'':<28}{'F':>9}{'I':>9}{'W':>9}{'B':>9}",
        f"{'transformers':<28}{layer['transformers']['forward'] * ms:>9.3f}{'-':>9}{'-':>9}"
        f"{layer['transformers']['backward'] * ms:>9.3f}",
    ]
    ours = layer["pp_ext"]
    lines += [
        f"{'pp-ext':<28}{ours['forward'] * ms:>9.3f}{ours['input_grad'] * ms:>9.3f}"
        f"{ours['weight_grad'] * ms:>9.3f}{ours['backward'] * ms:>9.3f}",
        f"{'pp-ext / transformers':<28}{layer['forward_ratio']:>9.3f}{'':>18}{layer['backward_ratio']:>9.3f}",
        f"pp-ext's first decoder layer of a chunk: F {ours['forward_first_in_chunk'] * ms:.3f} ms "
        f"(masks and rotary tables {ours['context_build'] * ms:.3f} ms, once per chunk and micro-batch); "
        f"I + W = {layer['split_ratio']:.3f} B",
    ]
    if "steps" in report:
        tokens = opts["micro_batch_size"] * opts["seq"] * opts["micro_batches"]
        lines += [
            "",
            f"train step: {opts['micro_batches']} micro-batches of {opts['micro_batch_size']} x {opts['seq']} "
            f"tokens ({tokens} per step), median of steps {opts['warmup'] + 1}-{opts['steps']}; "
            f"counts of one more step, and its peak memory ("
            + (
                "allocated above the step's start"
                if report["device"].startswith("cuda")
                else "saved for backward"
            )
            + ")",
            f"{'engine':<22}{'tokens/s':>12}{'vs DS':>8}{'vs 1f1b':>9}{'step s':>9}{'1st loss':>10}"
            f"{'reads':>7}{'syncs':>7}{'aten ops':>10}{'peak MiB':>10}",
        ]
        for row in report["steps"]:
            vs = f"{row['vs_1f1b']:.3f}" if "vs_1f1b" in row else "-"
            counts = (
                f"{row['host_reads']:>7}{row['synchronizations']:>7}{row['aten_ops']:>10}"
                f"{row['peak_step_mib']:>10.1f}"
                if "aten_ops" in row
                else f"{'-':>7}{'-':>7}{'-':>10}{'-':>10}"
            )
            lines.append(
                f"{row['engine']:<22}{row['tokens_per_s']:>12.1f}{row['vs_deepspeed']:>8.3f}{vs:>9}"
                f"{row['step_time_s']:>9.4f}{row['first_loss']:>10.4f}{counts}"
            )
        lines += [
            f"{row['engine']}: {row['ranks']} ({2 * opts['expert']} ranks after the rows above, "
            f"the same tokens per step), losses within {row['loss_vs_pipeline_1']:.2e} of pipeline 1's"
            for row in report["steps"]
            if "ranks" in row
        ]
    return "\n".join(lines)
