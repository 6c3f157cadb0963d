"""``pp-ext bench``: time ``train_batch`` for every schedule on one model, side by side.

One launch of ``stages`` local ranks (one thread each on CPU) times each schedule
on the same small Llama-shaped model (:mod:`pp_ext.testing.tiny`) and data:
DeepSpeed's own ``TrainSchedule`` on its stock engine (the baseline) and every
registered schedule that accepts the sizes. All engines are built first, then
timed round-robin, in a new order each round (``warmup`` untimed rounds,
``repeats`` timed ones), so that a change in machine load falls on every schedule
alike; the median is reported.

``auto`` is computed from the per-stage costs measured in the same launch (Qi et
al. 2024, "Zero Bubble Pipeline Parallelism", Sec. 3: the schedule follows the
profiled F, I, W and communication times), not from unit costs, with the same
memory as the hungriest fixed schedule: the largest peak activations of any fixed
synchronous schedule in the run, and as many weight replicas (2 where Chimera
runs). Its layout is its own choice (one chunk in loop placement or two in V
placement, both measured for it; Chimera's bidirectional placement with two
replicas). The simulator ranks auto's candidate programs
(:func:`~pp_ext.schedules.auto.ranked`), and the first ``auto_candidates`` of them
are built and timed in ``auto_trials`` rounds after the warm-up (rounds of all
engines, as the timed ones); the fastest of them (median) is auto's row in the
timed rounds. Where their simulated times differ by less than the simulator's
error (a few per cent here), measuring is what tells them apart, as autotuners do;
the trial rounds are not the timed ones, so the choice does not ride on the noise
of the rounds it is judged by. Each row also gives its ratio to the fastest fixed
synchronous row paired round by round (the median of the per-round ratios, and in
how many rounds it was faster): on a shared machine rounds drift together, so the
paired ratio is steadier than the ratio of medians.
With several ``partitions`` every schedule is timed on each cut of the model
(``balanced`` from a profile of the bench model, :func:`profile_tiny`).

It also measures what the simulator needs: per-stage F, I, W and fused B times of
the real layers (one set per layout: chunks x placement), the p2p latency of one
activation between two ranks, and the optimizer's time per step. The simulator's
step time for each schedule is its makespan on those costs plus the optimizer
time, so ``predicted_ratio`` (schedule / baseline, simulated) can be set against
``ratio_vs_deepspeed`` (schedule / baseline, measured in the same run).

The asynchronous schedules (``pipedream``, Narayanan et al. 2019, SOSP;
``pipedream-2bw``, Narayanan et al. 2021, ICML; ``pipemare``, Yang et al. 2021,
MLSys: :mod:`pp_ext.schedules.asynchronous`) keep their pipeline full across
``train_batch`` calls: an engine's first call is the fill, every later one the same
steady program, and only ``flush()`` drains it. What is timed for them is a steady
call: one ``train_batch`` of m micro-batches once the pipeline is full, so the fill
and the drain are amortised away, as over a long run (a stream of S calls has the
bubble (p-1)/(S*m+p-1) at F = B/2). In each round such an engine runs an untimed
fill, the timed call, then an untimed ``flush()``: a call leaves its last gradients
in flight, which would otherwise meet the next engine's messages on the same
channels. The call after the fill is a steady one: every call starts from the same
micro-batches in flight, with the ranks together (the barrier before it, and
DeepSpeed's ``train_batch`` ends each call with the loss broadcast from the last
stage). The prediction is the simulated growth of the stream per call
(:func:`~pp_ext.schedules.asynchronous.steady_call`) on the engine's costs: each
backward B first recomputes its forward (the engine keeps only a chunk's input,
:mod:`pp_ext.engine.async_engine`), so it costs F + B; each update is an optimizer
step of the measured time, m a call for ``pipedream`` and ``pipemare`` (an update
per micro-batch), 1 for ``pipedream-2bw``. The simulated stream keeps the ranks
staggered across calls, where the engine starts them together: the last stage
first waits p-1 forward hops, which the prediction leaves out. A call is the work
of a synchronous step (m micro-batches), on the same model: the bench model ties no
weights across ranks, which the asynchronous engine refuses.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
from deepspeed import comm as dist
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

from pp_ext.autograd.split_backward import WeightGradStore, enable_split_backward
from pp_ext.bench.measure import (
    allreduce_model,
    allreduce_seconds,
    comm_latency,
    measure_layers,
    median_time,
    time_passes,
)
from pp_ext.config.recipe import batch_config
from pp_ext.engine.async_engine import AsyncScheduleEngine
from pp_ext.engine.distributed import comm_device
from pp_ext.engine.initialize import initialize
from pp_ext.engine.module import ChunkedPipelineModule, partition
from pp_ext.schedules import REGISTRY, ConstraintError, Costs, build, get, simulate
from pp_ext.schedules.asynchronous import steady_call
from pp_ext.schedules.auto import layouts as auto_layouts
from pp_ext.schedules.auto import origin, ranked
from pp_ext.schedules.cost_model import Profile
from pp_ext.schedules.registry import BASELINE
from pp_ext.testing.spawn import spawn
from pp_ext.testing.tiny import TinyConfig, layer_specs, lm_loss
from pp_ext.tools.logging import get_logger

log = get_logger("pp-ext bench")


@dataclass(frozen=True)
class BenchOptions:
    stages: int = 2
    micro_batches: int = 4
    schedules: tuple[str, ...] = ()  # empty: the baseline and every schedule that accepts the sizes
    repeats: int = 5
    warmup: int = 2
    hidden: int = 256
    heads: int = 4
    intermediate: int = 688
    vocab: int = 512
    blocks_per_rank: int = 2
    seq: int = 128
    micro_batch_size: int = 4
    cost_repeats: int = 9
    auto_candidates: int = 3  # auto's simulated best programs timed against each other
    auto_trials: int = 5  # rounds of those trials (after the warm-up, before the timed rounds)
    # how the model is cut: 'type:Block' (blocks balanced, embedding and head on the end
    # stages), any partition method, or 'balanced' (measured, see the module doc)
    partitions: tuple[str, ...] = ("type:Block",)

    def plan(self, report=lambda message: None) -> list[tuple[str, int, str, str]]:
        """(schedule, chunks, placement, partition) to time, baseline first; raises on an unknown
        name or on sizes a named schedule refuses; ``report`` hears which ones are skipped."""
        names = [BASELINE] + [n for n in self.schedules or REGISTRY if n != BASELINE]
        plan = []
        for name in names:
            if name == BASELINE:
                plan.append((BASELINE, 1, "loop"))
                continue
            spec = get(name)
            try:
                spec.check(self.stages, self.micro_batches, spec.default_chunks)
            except ConstraintError as err:
                if self.schedules:
                    raise
                report(f"skipping {name}: {err}")
                continue
            plan.append((name, spec.default_chunks, spec.placement))
        return [(*row, cut) for cut in self.partitions for row in plan]


def _model(options: BenchOptions, chunks: int, placement: str, cut: str):
    config = tiny_config(options)
    return ChunkedPipelineModule(
        layers=layer_specs(config),
        topology=PipeDataParallelTopology(options.stages, 1),
        loss_fn=lm_loss,
        chunks=chunks,
        placement=placement,
        partition_method=cut,
        seed_layers=True,
        base_seed=1234,
    )


def batches(options: BenchOptions):
    gen = torch.Generator().manual_seed(0)
    ids = [
        torch.randint(options.vocab, (options.micro_batch_size, options.seq), generator=gen)
        for _ in range(options.micro_batches)
    ]
    return [(x, torch.roll(x, -1, dims=1)) for x in ids]


def _stage_costs(
    module, options: BenchOptions, rank: int
) -> dict[int, tuple[float, float, float, float]]:
    """Median F, I, W, B seconds of each chunk of this rank, keyed by global stage."""
    store = WeightGradStore()
    enable_split_backward(module, store)
    ids, labels = batches(options)[0]
    costs = {}
    for chunk in range(module.chunks):
        first, last = module.is_first_stage_chunk(chunk), module.is_last_stage_chunk(chunk)

        def forward():
            x = (
                ids
                if first
                else torch.randn(
                    options.micro_batch_size, options.seq, options.hidden, requires_grad=True
                )
            )
            out = module.chunk_forward(chunk, x)
            return module.loss_fn(out, labels) if last else out

        def backward(out):
            torch.autograd.backward(out, None if last else torch.ones_like(out))

        costs[module.stage_of_chunk(chunk)] = time_passes(
            forward, backward, store, options.cost_repeats
        )
    module.zero_grad(set_to_none=True)
    return costs


def replica_reduce_time(module, options: BenchOptions) -> float:
    """Seconds of summing this rank's replica gradients with its partner's, as the
    engine's ReduceReplicaGrads does (one flat all-reduce over ``replica_group``);
    0 where the module has one replica of each stage."""
    if module.replica_group is None:
        return 0.0
    flat = torch.zeros(sum(p.numel() for p in module.replica_parameters()), device=comm_device())
    result = torch.tensor(
        [allreduce_seconds(flat, options.cost_repeats, module.replica_group)], device=flat.device
    )
    dist.all_reduce(result, op=dist.ReduceOp.MAX)  # every rank waits for the slowest pair
    return float(result)


def activation_latency(options: BenchOptions, rank: int) -> float:
    """Half a ping-pong of one activation of the bench model between pipeline ranks 0 and 1."""
    if options.stages < 2:
        return 0.0
    return comm_latency(
        (options.micro_batch_size, options.seq, options.hidden), options.cost_repeats, rank
    )


def worker(rank: int, world: int, options: BenchOptions) -> list[dict] | None:
    plan = options.plan()
    step_batches = batches(options)
    ds_config = {
        **batch_config(options.micro_batch_size, options.micro_batches, 1),
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
    }
    schedules = [
        None
        if name == "auto"
        else build(
            "1f1b" if name == BASELINE else name, options.stages, options.micro_batches, layout[0]
        )
        for name, layout in ((row[0], row[1:]) for row in plan)
    ]
    # auto: the same memory as the hungriest fixed synchronous schedule (activations, replicas)
    fixed = [
        simulate(schedule)
        for schedule in schedules
        if schedule is not None and not schedule.backward_weights
    ]
    memory = max((sim.peak_activations for sim in fixed), default=None)
    replicas = int(max((sim.weight_copies for sim in fixed), default=1))
    # cost models are measured on modules of their own, with the same weights, before
    # the engines are built: auto is computed from them, in the layout it chooses
    # (each of its candidate layouts is measured, and each candidate placement is
    # weighed on its own layout's costs)
    candidates = [
        (placement.chunks, placement.name) for placement in auto_layouts(options.stages, replicas)
    ]
    probes = {
        layout: _model(options, *layout)
        for layout in dict.fromkeys(
            [row[1:] for row in plan]
            + [(*c, row[3]) for row in plan if row[0] == "auto" for c in candidates]
        )
    }
    comm = activation_latency(options, rank)
    layouts: dict[tuple[int, str, str], Costs] = {}
    for layout, probe in probes.items():
        log.info(
            f"measuring F/I/W/B per stage for {layout[0]} chunk(s) in {layout[1]} placement, "
            f"partition {layout[2]}",
        )
        gathered: list = [None] * world
        dist.all_gather_object(gathered, _stage_costs(probe, options, rank))
        stages = {s: c for part in gathered for s, c in part.items()}
        layouts[layout] = Costs(
            comm=comm,
            per_stage=tuple(stages[s] for s in sorted(stages)),
            replica_reduce=replica_reduce_time(probe, options),
        )

    def engine(name: str, schedule, layout):
        module = _model(options, *layout)
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-4)
        return initialize(
            model=module,
            optimizer=optimizer,
            config=ds_config,
            schedule=name if schedule is None else schedule,
        )[0]

    # auto's candidates: its simulated best programs, each built in its own layout
    trials = {
        index: [
            (schedule, engine("auto", schedule, (schedule.chunks, schedule.placement.name, cut)))
            for schedule, _ in ranked(
                options.stages,
                options.micro_batches,
                {c[1]: layouts[c + (cut,)] for c in candidates},
                memory,
                replicas=replicas,
            )[: options.auto_candidates]
        ]
        for index, (name, *_, cut) in enumerate(plan)
        if name == "auto"
    }
    engines = [None if name == "auto" else engine(name, None, layout) for name, *layout in plan]

    def step(engine) -> float:
        """Seconds of one train_batch (the slowest rank's); an asynchronous engine's
        call once its pipeline is full, between an untimed fill and drain."""
        steady = isinstance(engine, AsyncScheduleEngine)
        if steady:
            engine.train_batch(iter(step_batches))
        dist.barrier()
        start = time.perf_counter()
        engine.train_batch(iter(step_batches))
        elapsed = torch.tensor([time.perf_counter() - start], device=comm_device())
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if steady:  # its last gradients are still in flight: receiving them here keeps
            engine.flush()  # them from the next engine's messages on the same channels
        return float(elapsed)

    def rounds(indices: list, count: int, label: str, times: dict) -> None:
        """``count`` rounds over the engines ``indices`` name (keys of ``timed``), in a
        new order each round (the same on every rank: one seed): drift in machine load
        touches all alike, and what one leaves behind (an asynchronous flush, freed
        memory) does not fall on the same successor every round."""
        order = list(indices)
        for repeat in range(count):
            log.info(f"{label} round {repeat + 1} of {count}")
            shuffle(order)
            for key in order:
                times.setdefault(key, []).append(step(timed[key]))

    shuffle = random.Random(0).shuffle
    timed = {index: e for index, e in enumerate(engines) if e is not None}
    timed |= {
        (index, k): e for index, programs in trials.items() for k, (_, e) in enumerate(programs)
    }
    rounds(list(timed), options.warmup, "warm-up", {})
    optimizer_time = median_time(timed[0].optimizer.step, options.cost_repeats)
    # the trials run among all engines, as the timed rounds do: a schedule's time
    # depends on what runs around it (caches, allocator), by as much as auto's
    # candidates differ
    trial_times: dict = {}
    rounds(list(timed), options.auto_trials if trials else 0, "auto's trial", trial_times)
    choices = {}
    for index, programs in trials.items():
        medians = [
            statistics.median(trial_times[(index, k)]) if options.auto_trials else 0.0
            for k in range(len(programs))
        ]
        chosen = min(
            range(len(programs)), key=lambda k: (medians[k], k)
        )  # ties: the simulated best
        best, timed[index] = programs[chosen]
        schedules[index], cut = best, plan[index][3]
        plan[index] = ("auto", best.chunks, best.placement.name, cut)
        choices[index] = [
            {
                "origin": origin(schedule) or f"auto ({schedule.placement.name})",
                "predicted_step_s": float(
                    simulate(
                        schedule, layouts[(schedule.chunks, schedule.placement.name, cut)]
                    ).makespan
                )
                + optimizer_time,
                "trial_s": median,
                "chosen": k == chosen,
            }
            for k, ((schedule, _), median) in enumerate(zip(programs, medians))
        ]
    times: dict = {}
    rounds(list(range(len(plan))), options.repeats, "timed", times)
    rows = []
    for index, (name, chunks, placement, cut) in enumerate(plan):
        schedule, column = schedules[index], times[index]
        assert schedule is not None  # auto's chosen above
        steady = bool(schedule.backward_weights)
        costs = layouts[(chunks, placement, cut)]
        if steady:  # the stream's growth per call on the asynchronous engine's costs: its
            # backward first recomputes the forward (it keeps only a chunk's input), U is an optimizer step
            assert costs.per_stage is not None  # measured per stage above
            engine_costs = dataclasses.replace(
                costs,
                update=optimizer_time,
                per_stage=tuple(
                    (f, i + f, w, *(b + f for b in fused)) for f, i, w, *fused in costs.per_stage
                ),
            )
            predicted = float(
                steady_call(name, options.stages, options.micro_batches, engine_costs)
            )
        else:
            predicted = float(simulate(schedule, costs).makespan) + optimizer_time
        rows.append(
            {
                "schedule": name,
                "stages": options.stages,
                "micro_batches": options.micro_batches,
                "chunks": chunks,
                "placement": placement,
                "partition": cut.split(":")[0] if cut.startswith("balanced:") else cut,
                "asynchronous": steady,
                "step_time_s": statistics.median(column),
                "step_times_s": column,
                "predicted_step_s": predicted,
                "costs": costs.to_json(),
            }
        )
        if index in choices:
            rows[-1]["auto_trials"] = choices[index]
    base, base_predicted = rows[0]["step_time_s"], rows[0]["predicted_step_s"]
    for row in rows:
        row["ratio_vs_deepspeed"] = row["step_time_s"] / base
        row["predicted_ratio"] = row["predicted_step_s"] / base_predicted
        # measured speed-up as a share of the simulated one (1.0: as fast as predicted)
        row["efficiency"] = row["predicted_ratio"] / row["ratio_vs_deepspeed"]
    paired_with_fastest_fixed(rows)
    return rows if rank == 0 else None


def paired_with_fastest_fixed(rows: list[dict]) -> None:
    """Add to each row its step time against the fastest fixed synchronous row (the
    smallest median; ``auto`` and the asynchronous schedules are not fixed ones)
    paired by round: ``vs_fastest_fixed`` names it and gives the median of the
    per-round ratios and in how many rounds the row was faster."""
    fixed = [row for row in rows if row["schedule"] != "auto" and not row["asynchronous"]]
    fastest = min(fixed, key=lambda row: row["step_time_s"])
    for row in rows:
        ratios = [t / b for t, b in zip(row["step_times_s"], fastest["step_times_s"])]
        row["vs_fastest_fixed"] = {
            "schedule": fastest["schedule"],
            "partition": fastest["partition"],
            "median_ratio": statistics.median(ratios),
            "faster_rounds": sum(r < 1 for r in ratios),
            "rounds": len(ratios),
        }


def tiny_config(options: BenchOptions) -> TinyConfig:
    """The bench's Llama-shaped model (:mod:`pp_ext.testing.tiny`) at ``options``' sizes."""
    return TinyConfig(
        vocab=options.vocab,
        hidden=options.hidden,
        heads=options.heads,
        intermediate=options.intermediate,
        blocks=options.blocks_per_rank * options.stages,
        tied=False,
    )


def _profile_worker(rank: int, world: int, options: BenchOptions) -> Profile | None:
    config = tiny_config(options)
    layers = layer_specs(config)
    # pipeline 1 x data 2: each rank holds every layer, one chunk each; the second
    # rank is the peer of the p2p measurement
    module = ChunkedPipelineModule(
        layers=layers,
        topology=PipeDataParallelTopology(1, world),
        loss_fn=lm_loss,
        chunks=len(layers),
        partition_method="uniform",
        seed_layers=True,
        base_seed=1234,
    )
    torch.set_num_threads(1)
    comm = activation_latency(options, rank)
    latency, bandwidth = allreduce_model(module, options.cost_repeats)
    if rank != 0:
        return None
    ids, labels = batches(options)[0]
    return Profile(
        tuple(measure_layers(module, ids, labels, options.cost_repeats)),
        comm,
        options.micro_batch_size,
        options.seq,
        allreduce_latency=latency,
        allreduce_bandwidth=bandwidth,
    )


def profile_tiny(options: BenchOptions) -> Profile:
    """Profile the bench model of ``options`` layer by layer on this machine (one launch
    of 2 local ranks, as :func:`pp_ext.bench.profiler.profile_recipe` does for a recipe's model):
    the costs of the ``balanced`` partition."""
    return spawn(_profile_worker, 2, options)[0]


def run(options: BenchOptions) -> list[dict]:
    # unknown names, refused sizes and unknown partition methods fail here, before any rank starts
    options.plan(report=lambda message: log.info(message))
    for cut in set(options.partitions) - {"balanced"}:
        partition(layer_specs(tiny_config(options)), options.stages, cut)
    with tempfile.TemporaryDirectory() as folder:
        if "balanced" in options.partitions:
            log.info("profiling the model layer by layer for the balanced partition")
            path = profile_tiny(options).save(f"{folder}/profile.json")
            options = dataclasses.replace(
                options,
                partitions=tuple(
                    f"balanced:{path}" if cut == "balanced" else cut for cut in options.partitions
                ),
            )
        return spawn(worker, options.stages, options)[0]
