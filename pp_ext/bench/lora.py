"""``pp-ext bench --lora RECIPE``: LoRA through pp-ext's pipeline next to what users run
instead, DeepSpeed ZeRO-3 with PEFT's ``get_peft_model`` on transformers' model over
data ranks (the LLaMA-Factory and Axolotl setup), in one launch of 2 ranks.

Both sides train the recipe's model with the recipe's ``peft`` section (PEFT's
``LoraConfig``) on the same global batch: the pipeline (2 stages, data 1) runs all
``parallel.micro_batches`` micro-batches of ``train.micro_batch_size`` x
``data.seq_len`` tokens per step; ZeRO-3 (Rajbhandari et al. 2020, "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models", stage 3: weights, gradients
and optimizer state partitioned over the 2 data ranks, every layer's weights
all-gathered for its forward and again for its backward) runs half of them on each
rank. They start from the same weights: the base model's (transformers' own, loaded
or initialised under ``train.seed``) and the adapters pp-ext's ranks initialised,
gathered and set into PEFT's model with ``set_peft_model_state_dict``; the optimizer
is the recipe's (:func:`pp_ext.training.optim.make_optimizer`, constant learning
rate) over what requires a gradient, and the DeepSpeed config the recipe's bases
(ZeRO stage 3 on the data side). So every side's k-th loss is the same number up to
summation order, which is what shows that ZeRO-3 trains the same adapters on the same
tokens; each row also counts its trainable parameters and the tokens its model
replicas took from the data in one step (and a digest of them).

Engines are built first and stepped round-robin, in a new order each round (the same
on every rank), ``warmup`` untimed rounds then ``repeats`` timed ones; tokens/s is the
global batch over the median step time (the slowest rank's). One more step per
engine measures memory per rank (:func:`memory`); its method is the table's footnote.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from deepspeed.utils import groups
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from pp_ext.config.recipe import batch_config, deepspeed_config, load
from pp_ext.config.schema import Recipe
from pp_ext.data import IGNORE_INDEX
from pp_ext.engine.boundary import ignore_deepspeed_deprecations
from pp_ext.engine.initialize import initialize
from pp_ext.hf import build_pipeline_module, copy_hf_weights
from pp_ext.hf.loading import has_weights, load_config, local_layers, to_dtype
from pp_ext.peft import Targets, apply_lora, lora_config, peft_keys
from pp_ext.peft.config import peft_model_warnings
from pp_ext.schedules import get
from pp_ext.testing.spawn import spawn
from pp_ext.tools.logging import get_logger
from pp_ext.training.loss import LanguageModelLoss
from pp_ext.training.optim import make_optimizer

log = get_logger("pp-ext bench")

RANKS = 2  # pipeline 2 x data 1 against ZeRO-3 over data 2
ZERO3 = "zero-3 + peft"
MEMORY = ("weights", "gradients", "optimizer", "activations")
FOOTNOTE = (
    "memory per rank, MiB: weights, the parameter tensors the rank holds between steps (ZeRO-3: "
    "its partitions, and the small parameters it keeps whole); gradients, the rank's trainable "
    "elements (ZeRO-3: its partition) x the gradient's element size; optimizer, the tensors in "
    "the optimizer's state_dict that are not weights (moments, ZeRO-3's fp32 partitions); "
    "activations, on CPU the peak bytes alive of what autograd saves for backward during one "
    "step (parameters and their views left out, a storage counted once, held until its last "
    "reference goes: W passes' deferred inputs too), as the schedule bench's profile measures "
    "them; on CUDA torch.cuda.max_memory_allocated over one step less memory_allocated at its "
    "start (also the gradients being formed, ZeRO-3's gathered weights and buffers); total, "
    "their sum"
)


@dataclass(frozen=True)
class LoraBenchOptions:
    recipe: str
    overrides: tuple[str, ...] = ()
    schedules: tuple[str, ...] = ("1f1b", "zb-h1", "zbv")
    warmup: int = 2
    repeats: int = 5

    def load(self) -> Recipe:
        return load(self.recipe, self.overrides)

    def check(self) -> Recipe:
        """The recipe, or one ValueError line for what cannot run (before any rank starts)."""
        recipe = self.load()
        if recipe.peft.type != "lora":
            raise ValueError(
                f"the recipe trains in full (peft.type {recipe.peft.type}): the LoRA bench "
                f"compares LoRA runs; add peft.type=lora (e.g. peft.target_modules=all-linear)"
            )
        m = recipe.parallel.micro_batches
        if m % RANKS:
            raise ValueError(
                f"parallel.micro_batches={m} cannot be split over ZeRO-3's {RANKS} data ranks "
                f"(the same global batch on both sides): give an even number"
            )
        for name in self.schedules:
            spec = get(name)
            spec.check(RANKS, m, spec.default_chunks)
        config = load_config(recipe.model.path)
        Targets.of(lora_config(recipe.peft, config), config)  # PeftError
        return recipe


# --------------------------------------------------------------------------- data


def batches(recipe: Recipe, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The step's ``parallel.micro_batches`` pairs of (token ids, labels shifted by one;
    the last position unlabelled), the same every step: pp-ext's loss reads labels
    shifted, HF's model shifts the ids itself, so both score the same tokens."""
    gen = torch.Generator().manual_seed(recipe.train.seed)
    out = []
    for _ in range(recipe.parallel.micro_batches):
        ids = torch.randint(
            vocab, (recipe.train.micro_batch_size, recipe.data.seq_len), generator=gen
        )
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def feed(data: list, pulled: list[int]):
    """``data`` as an iterator that notes the index of each micro-batch taken."""
    for index, batch in enumerate(data):
        pulled.append(index)
        yield batch


def fed(data: list, replica: int, pulled: list[int]) -> dict:
    """Tokens the model replicas took in one step, summed over replicas (each replica's
    distinct micro-batches, whichever of its ranks took them), and a digest of the
    micro-batches taken, replica by replica; every rank gets the same. Collective."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (replica, sorted(set(pulled))))
    replicas: dict[int, set[int]] = {}
    for owner, indices in gathered:
        replicas.setdefault(owner, set()).update(indices)
    taken = sorted(
        hashlib.sha256(data[i][0].numpy().tobytes()).hexdigest()
        for indices in replicas.values()
        for i in indices
    )
    return {
        "tokens_per_step": sum(
            data[i][0].numel() for indices in replicas.values() for i in indices
        ),
        "batch_digest": hashlib.sha256("".join(taken).encode()).hexdigest()[:16],
    }


# --------------------------------------------------------------------------- memory


def _unique_bytes(tensors) -> int:
    """Bytes of ``tensors``, a tensor met twice (same address and size) counted once."""
    seen = {(t.data_ptr(), t.numel()): t.numel() * t.element_size() for t in tensors if t.numel()}
    return sum(seen.values())


def _tensors(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _held(module: torch.nn.Module) -> list[torch.Tensor]:
    """The parameter tensors the rank holds: ``data`` (empty for a ZeRO-3 partitioned
    parameter between its uses) and ZeRO-3's partition ``ds_tensor``."""
    return [
        t
        for p in module.parameters()
        for t in (p.data, getattr(p, "ds_tensor", None))
        if t is not None
    ]


def _numel(param: torch.nn.Parameter) -> int:
    """The parameter's full size (ZeRO-3 keeps it in ``ds_numel`` once partitioned)."""
    return getattr(param, "ds_numel", param.numel())


class SavedBytes:
    """While active, the peak bytes alive of the tensors autograd saves for backward
    (``saved_tensors_hooks``): parameters and views of them are not activations; a
    storage saved twice counts once; a tensor counts until its last reference goes
    (``weakref.finalize``), so inputs a W pass holds after the I pass count too."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors alive]
        self.now = self.peak = 0

    def _drop(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter):
            return tensor
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self.live[key][1] += 1
        weakref.finalize(tensor, self._drop, key)
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def step_peak(run: Callable[[], Any], device: torch.device) -> tuple[Any, int, int]:
    """``run()``'s result, its peak bytes (on CUDA allocated above its start, elsewhere the
    peak saved for backward) and the peak saved for backward (:class:`SavedBytes`)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    with SavedBytes() as saved:
        result = run()
    if cuda:
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - start, saved.peak
    return result, saved.peak, saved.peak


def memory(side: Side, data: list, device: torch.device) -> tuple[float, dict]:
    """One step of ``side`` measured: its loss and this rank's bytes by kind (see FOOTNOTE)."""
    module, optimizer = side.module, side.engine.optimizer
    weights = _held(module)
    addresses = {(t.data_ptr(), t.numel()) for t in weights}
    state = [
        t for t in _tensors(optimizer.state_dict()) if (t.data_ptr(), t.numel()) not in addresses
    ]
    trainable = [p for p in module.parameters() if p.requires_grad]
    grad_size = 4 if side.fp32_grads else trainable[0].element_size()
    loss, activations, saved_for_backward = step_peak(lambda: side.step(data), device)
    return loss, {
        "weights": _unique_bytes(weights),
        "gradients": grad_size * sum(getattr(p, "ds_tensor", p).numel() for p in trainable),
        "optimizer": _unique_bytes(state),
        "activations": activations,
        "saved_for_backward": saved_for_backward,
    }


# --------------------------------------------------------------------------- the sides


@dataclass
class Side:
    """One engine of the comparison: ``step(data)`` trains one step and returns the
    global mean loss; ``pulled`` collects the micro-batch indices this rank took."""

    name: str
    engine: Any
    module: torch.nn.Module
    replica: int  # this rank's model replica (data-parallel rank)
    fp32_grads: bool
    pulled: list[int]

    def step(self, data: list) -> float:
        raise NotImplementedError


class PipelineSide(Side):
    def step(self, data: list) -> float:
        return float(self.engine.train_batch(feed(data, self.pulled)))


@contextlib.contextmanager
def without_pipeline_groups():
    """DeepSpeed's process groups as a plain data-parallel engine sees them: its
    ``groups`` module keeps one process-wide ``mpu``, set by the last engine built with
    one (a pipeline engine's grid, whose pipeline ranks it counts as model-parallel),
    which the ZeRO-3 engine would otherwise take for its own."""
    kept, groups.mpu = groups.mpu, None
    try:
        yield
    finally:
        groups.mpu = kept


class Zero3Side(Side):
    @without_pipeline_groups()
    def step(self, data: list) -> float:
        """This rank's share of the micro-batches (every ``RANKS``-th), DeepSpeed's
        gradient accumulation over them; the loss averaged over the data ranks."""
        total = torch.zeros((), device=self.engine.device)
        for index in range(self.replica, len(data), RANKS):
            self.pulled.append(index)
            ids = data[index][0].to(self.engine.device)
            # HF labels are the ids (the model shifts them); no KV cache in training
            loss = self.engine(input_ids=ids, labels=ids, use_cache=False).loss
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach()
        dist.all_reduce(total)
        return float(total) / len(data)


def _fp32_grads(recipe: Recipe, config: dict) -> bool:
    accumulate = config.get("data_types", {}).get("grad_accum_dtype")
    return accumulate == "fp32" or to_dtype(recipe.model.dtype) == torch.float32


def hf_model(recipe: Recipe, device: torch.device):
    """Transformers' model of the recipe: its weights where the folder has them, else
    HF's initialisation under ``train.seed``."""
    dtype = to_dtype(recipe.model.dtype)
    kwargs: dict = {"dtype": dtype}
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    torch.manual_seed(recipe.train.seed)
    if has_weights(recipe.model.path):
        model = AutoModelForCausalLM.from_pretrained(recipe.model.path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_config(load_config(recipe.model.path), **kwargs)
    model.to(device)  # type: ignore[arg-type]  # transformers' stubs type .to() as unbound
    return model.train()


def pipeline_side(recipe: Recipe, state: dict, schedule: str) -> PipelineSide:
    """pp-ext at pipeline 2 (``schedule``'s chunks and placement) holding ``state`` (the
    HF model's weights) with the recipe's LoRA adapters."""
    spec = get(schedule)
    loss = LanguageModelLoss()
    module = build_pipeline_module(
        recipe.model.path,
        topology=PipeModelDataParallelTopology(num_pp=RANKS, num_mp=1, num_dp=1),
        chunks=spec.default_chunks,
        placement=spec.placement,
        partition_method=recipe.parallel.partition,
        loss_fn=loss,
        dtype=recipe.model.dtype,
        attn_implementation=recipe.model.attn_implementation,
        activation_checkpoint_interval=recipe.model.activation_checkpoint_interval,
        seed=recipe.train.seed,
    )
    copy_hf_weights(local_layers(module), state)
    apply_lora(module, recipe.peft, recipe.model.path, recipe.train.seed)
    config = deepspeed_config(recipe, 1)
    engine, *_ = initialize(
        model=module, optimizer=make_optimizer(recipe, module), config=config, schedule=schedule
    )
    return PipelineSide(
        f"pp-ext {schedule}",
        engine,
        module,
        engine.grid.get_data_parallel_rank(),
        _fp32_grads(recipe, config),
        [],
    )


def adapters(module) -> dict[str, torch.Tensor]:
    """Every rank's trainable tensors of ``module`` under PEFT's keys, on every rank. Collective."""
    own: dict[str, torch.Tensor] = {}
    for layer in local_layers(module):
        params = dict(layer.named_parameters())
        own |= {key: params[name].detach().cpu() for name, key in peft_keys(layer).items()}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    return {key: tensor for part in gathered for key, tensor in part.items()}


def zero3_side(recipe: Recipe, model, start: dict[str, torch.Tensor]) -> Zero3Side:
    """DeepSpeed ZeRO-3 over the ranks on PEFT's ``get_peft_model(model)`` with the
    adapters ``start`` (PEFT's keys)."""
    with peft_model_warnings():
        wrapped = get_peft_model(model, lora_config(recipe.peft, model.config))
    expected = set(get_peft_model_state_dict(wrapped))
    if expected != set(start):
        raise RuntimeError(
            f"pp-ext's adapters and PEFT's differ: {sorted(expected ^ set(start))[:4]}"
        )
    set_peft_model_state_dict(wrapped, start)
    config = deepspeed_config(recipe, RANKS)
    hidden = model.config.hidden_size
    config.update(
        batch_config(recipe.train.micro_batch_size, recipe.parallel.micro_batches // RANKS, RANKS),
        # the bucket sizes and persistence threshold transformers' Trainer fills in for
        # "auto" (integrations/deepspeed.py), as LLaMA-Factory's ds_z3_config asks: a
        # parameter under 10 x hidden elements stays whole on every rank
        zero_optimization={
            **config.get("zero_optimization", {}),
            "stage": 3,
            "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden,
        },
    )
    with without_pipeline_groups():
        engine, *_ = deepspeed.initialize(
            model=wrapped, optimizer=make_optimizer(recipe, wrapped), config=config
        )
    return Zero3Side(ZERO3, engine, wrapped, dist.get_rank(), _fp32_grads(recipe, config), [])


# --------------------------------------------------------------------------- run


def worker(rank: int, world: int, options: LoraBenchOptions) -> dict | None:
    ignore_deepspeed_deprecations()
    recipe = options.load()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = load_config(recipe.model.path)
    data = batches(recipe, config.vocab_size)
    model = hf_model(recipe, device)
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    log.info(f"building pp-ext's engines ({', '.join(options.schedules)}) and ZeRO-3's")
    sides: list[Side] = [pipeline_side(recipe, state, schedule) for schedule in options.schedules]
    del state
    sides.append(zero3_side(recipe, model, adapters(sides[0].module)))
    losses: dict[str, list[float]] = {side.name: [] for side in sides}
    times: dict[str, list[float]] = {side.name: [] for side in sides}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    order, shuffle = list(range(len(sides))), random.Random(recipe.train.seed).shuffle
    total = options.warmup + options.repeats
    for round_ in range(total):
        label = "warm-up" if round_ < options.warmup else "timed"
        log.info(f"{label} round {round_ + 1} of {total}")
        shuffle(order)
        for index in order:
            side = sides[index]
            dist.barrier()
            start = time.perf_counter()
            losses[side.name].append(side.step(data))
            sync()
            elapsed = torch.tensor([time.perf_counter() - start], device=device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[side.name].append(float(elapsed))
    log.info("one more step each, measuring memory")
    rows = []
    for side in sides:
        side.pulled.clear()
        loss, held = memory(side, data, device)
        losses[side.name].append(loss)
        if isinstance(side, PipelineSide):  # each rank holds its own layers
            count = torch.tensor(
                [sum(p.numel() for p in side.module.parameters() if p.requires_grad)],
                device=device,
            )
            dist.all_reduce(count)
            trainable = int(count)
        else:  # every rank sees every parameter, partitioned
            trainable = sum(_numel(p) for p in side.module.parameters() if p.requires_grad)
        per_rank: list = [None] * world
        dist.all_gather_object(per_rank, held)
        timed = times[side.name][options.warmup :]
        rows.append(
            {
                "engine": side.name,
                "ranks": f"pipeline {RANKS}" if isinstance(side, PipelineSide) else f"data {RANKS}",
                **fed(data, side.replica, side.pulled),
                "tokens_per_s": tokens(recipe) / statistics.median(timed),
                "step_time_s": statistics.median(timed),
                "step_times_s": timed,
                "losses": losses[side.name],
                "trainable": trainable,
                "memory": per_rank,
            }
        )
    base = rows[-1]["tokens_per_s"]
    for row in rows:
        row["vs_zero3"] = row["tokens_per_s"] / base
    if rank:
        return None
    return {
        "device": describe(device),
        "model_type": config.model_type,
        "decoder_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "dtype": recipe.model.dtype,
        "lora": {
            "r": recipe.peft.r,
            "lora_alpha": recipe.peft.lora_alpha,
            "target_modules": _plain(recipe.peft.target_modules),
        },
        "micro_batches": recipe.parallel.micro_batches,
        "micro_batch_size": recipe.train.micro_batch_size,
        "seq_len": recipe.data.seq_len,
        "warmup": options.warmup,
        "repeats": options.repeats,
        "rows": rows,
    }


def _plain(value):
    """An OmegaConf list as a list (JSON)."""
    return value if value is None or isinstance(value, str) else list(value)


def tokens(recipe: Recipe) -> int:
    """Tokens of one global batch."""
    return recipe.parallel.micro_batches * recipe.train.micro_batch_size * recipe.data.seq_len


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{RANKS} x cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({RANKS} ranks, {torch.get_num_threads()} thread each)"


def run(options: LoraBenchOptions) -> dict:
    """The report of one run: ``RANKS`` local ranks (one GPU each, or CPU threads)."""
    options.check()
    return spawn(worker, RANKS, options)[0]


def format_report(report: dict) -> str:
    """The report as plain-text tables, the memory method as the footnote."""
    mib = 2**20
    lora = report["lora"]
    lines = [
        f"LoRA r={lora['r']} lora_alpha={lora['lora_alpha']} target_modules={lora['target_modules']}: "
        f"{report['model_type']}, {report['decoder_layers']} decoder layers, hidden "
        f"{report['hidden_size']}, {report['dtype']} on {report['device']}",
        f"global batch {report['micro_batches']} x {report['micro_batch_size']} x "
        f"{report['seq_len']} tokens per step (ZeRO-3: half the micro-batches on each data "
        f"rank); tokens/s over the median of {report['repeats']} steps after "
        f"{report['warmup']} warm-up rounds",
        f"{'engine':<16}{'ranks':>12}{'tokens/s':>11}{'vs ZeRO-3':>10}{'step s':>9}"
        f"{'tokens':>8}  {'digest':<17}{'trainable':>11}{'loss first':>11}{'last':>9}",
    ]
    for row in report["rows"]:
        lines.append(
            f"{row['engine']:<16}{row['ranks']:>12}{row['tokens_per_s']:>11.1f}"
            f"{row['vs_zero3']:>10.3f}{row['step_time_s']:>9.4f}{row['tokens_per_step']:>8}  "
            f"{row['batch_digest']:<17}{row['trainable']:>11,}{row['losses'][0]:>11.5f}"
            f"{row['losses'][-1]:>9.5f}"
        )
    lines += [
        "",
        f"{'engine':<16}{'rank':>5}" + "".join(f"{kind:>13}" for kind in MEMORY) + f"{'total':>10}",
    ]
    for row in report["rows"]:
        for rank, held in enumerate(row["memory"]):
            lines.append(
                f"{row['engine']:<16}{rank:>5}"
                + "".join(f"{held[kind] / mib:>13.3f}" for kind in MEMORY)
                + f"{sum(held[kind] for kind in MEMORY) / mib:>10.3f}"
            )
    lines.append(FOOTNOTE)
    return "\n".join(lines)
