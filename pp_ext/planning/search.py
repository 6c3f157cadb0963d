"""The search of ``pp-ext tune``, pure: every synchronous schedule at each chunk count it
allows, and ``auto`` on the measured costs, over micro-batch splits of the same global
batch and over partitions, simulated on a profile's per-stage costs, candidates over the
memory limit dropped (:mod:`pp_ext.commands.tune` says what is searched and why: Qi et
al. 2024, Sec. 3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pp_ext.planning.memory import StateBytes, rank_state
from pp_ext.planning.partition import balanced_parts, chunk_layout
from pp_ext.schedules import REGISTRY, Placement, Schedule, ScheduleError, simulate
from pp_ext.schedules.auto import auto_schedule
from pp_ext.schedules.cost_model import Profile

MICRO_BATCH_FACTORS = (0.25, 0.5, 1, 2, 4)


MAX_CHUNKS = 4


PARTITIONS = ("parameters", "uniform", "balanced")


GIB = 2**30


@dataclass(frozen=True)
class Candidate:
    schedule: str
    chunks: int
    micro_batches: int
    micro_batch_size: int
    partition: str
    step_s: float
    bubble: float
    memory: tuple[float, ...]  # peak bytes per pipeline rank
    memory_limit: tuple[int, ...] | None = (
        None  # auto's limit in micro-batches, when one was derived
    )


def micro_batch_splits(micro_batches: int, micro_batch_size: int) -> list[tuple[int, int]]:
    """``(micro_batches, micro_batch_size)`` around the recipe's with the same global batch."""
    batch = micro_batches * micro_batch_size
    splits = []
    for factor in MICRO_BATCH_FACTORS:
        m = micro_batches * factor
        if m == int(m) and m >= 1 and batch % int(m) == 0:
            splits.append((int(m), batch // int(m)))
    return splits


def search(
    profiles: dict[int, Profile],
    params: Sequence[tuple[int, int]],
    cut_by: Callable[[str, int], list[int]],
    pipe: int,
    batch: int,
    per_param: StateBytes,
    memory_limit: float | None,
    expert: int = 1,
) -> tuple[list[Candidate], int]:
    """Every candidate, fastest first, and the number dropped for memory.

    ``profiles`` by micro-batch size; ``params`` the (frozen, trainable) parameters of each
    layer; ``cut_by(method, stages)`` the boundaries of a method that needs no measurement
    ('parameters', 'uniform'; 'balanced' is cut here on each profile's layer costs);
    ``batch`` the samples per step and data rank (micro-batches x micro-batch size);
    ``per_param`` the state bytes per trainable parameter
    (:func:`pp_ext.planning.memory.state_bytes`, a frozen one holds its weight only);
    ``memory_limit`` GiB per rank or None; ``expert`` the ranks each MoE layer's experts
    are spread over (their all-to-alls priced in F and I, :meth:`Profile.stage_costs`)."""
    layers = len(params)
    limit_bytes = None if memory_limit is None else memory_limit * GIB
    found, dropped, parts_of = [], 0, {}

    def parts(method: str, stages: int, size: int) -> list[int]:
        key = (method, stages, size if method == "balanced" else None)
        if key not in parts_of:
            parts_of[key] = (
                balanced_parts(profiles[size].layer_costs(layers), stages)
                if method == "balanced"
                else cut_by(method, stages)
            )
        return parts_of[key]

    def cuts(stages: int, size: int) -> list[tuple[str, list[int]]]:
        """Each distinct cut once, labelled by the methods that give it ('parameters=balanced')."""
        methods: dict[tuple[int, ...], list[str]] = {}
        for method in PARTITIONS:
            methods.setdefault(tuple(parts(method, stages, size)), []).append(method)
        return [("=".join(names), list(cut)) for cut, names in methods.items()]

    def memory(placement, cut: list[int], size: int) -> tuple[list[float], list[float]]:
        """Per rank: bytes of weights, gradients and optimizer state; activation bytes of one micro-batch."""
        held = [chunk_layout(placement, cut, rank) for rank in range(pipe)]
        act = profiles[size].activation_bytes(cut)
        layers_of = [[i for a, b in bounds for i in range(a, b)] for bounds in held]
        static = [
            rank_state(
                sum(params[i][0] for i in own), sum(params[i][1] for i in own), per_param
            ).total
            for own in layers_of
        ]
        act_rank = [
            sum(act[placement.holds(rank, c)[1]] for c in range(placement.chunks))
            for rank in range(pipe)
        ]
        return static, act_rank

    def consider(schedule, method: str, cut: list[int], size: int, limits=None) -> None:
        nonlocal dropped
        sim = simulate(schedule, profiles[size].stage_costs(cut, expert))
        static, act_rank = memory(schedule.placement, cut, size)
        peak = tuple(
            s + float(n) * a for s, n, a in zip(static, sim.peak_activations_per_rank, act_rank)
        )
        if limit_bytes is not None and max(peak) > limit_bytes:
            dropped += 1
            return
        found.append(
            Candidate(
                schedule.name,
                schedule.placement.chunks,
                schedule.micro_batches,
                size,
                method,
                float(sim.makespan),
                float(sim.bubble_ratio),
                peak,
                limits,
            )
        )

    for size in sorted(profiles):
        m = batch // size
        for name, spec in REGISTRY.items():
            if (
                name == "auto"
            ):  # per placement and partition from the measured costs, within the memory limit
                for placement in (Placement.loop(pipe), Placement.v(pipe, 2)):
                    if placement.stages > layers:
                        continue  # too few layers
                    for method, cut in cuts(placement.stages, size):
                        limits = None
                        if limit_bytes is not None:
                            static, act_rank = memory(placement, cut, size)
                            limits = tuple(
                                min(m, int((limit_bytes - s) // a)) if a else m
                                for s, a in zip(static, act_rank)
                            )
                            if min(limits) < 1:
                                dropped += 1
                                continue
                        consider(
                            auto_schedule(
                                pipe,
                                m,
                                profiles[size].stage_costs(cut, expert),
                                limits,
                                placement.chunks,
                            ),
                            method,
                            cut,
                            size,
                            limits,
                        )
                continue
            if not spec.synchronous:
                continue  # asynchronous: not the training the recipe asks for
            for chunks in range(1, MAX_CHUNKS + 1):
                try:
                    schedule = spec.build(pipe, m, chunks)
                except ScheduleError:
                    continue
                if schedule.placement.stages > layers:
                    continue  # too few layers
                for method, cut in cuts(schedule.placement.stages, size):
                    consider(schedule, method, cut, size)
    found.sort(key=lambda c: (c.step_s, max(c.memory)))
    return found, dropped


def profiled_auto(
    recipe,
    pipe: int,
    cut_by: Callable[[int], list[int]],
    memory_limit: int | Sequence[int] | None,
) -> Schedule:
    """``parallel.schedule: auto`` with ``parallel.profile``: :func:`auto_schedule` on the
    profile's per-stage costs for the recipe's partition (Qi et al. 2024, Sec. 3: the best
    order depends on the measured F, I, W and communication; with ``parallel.expert`` > 1
    the MoE layers' all-to-alls are priced in F and I), under ``memory_limit``
    micro-batches per rank (None: 1F1B's), in the placement ``parallel.chunks`` names (1:
    loop, 2: V) or, without it, the one auto chooses from the costs of both cuts (p and 2p
    stages; 2p only where the partition method can cut that many). ``cut_by(stages)``: the
    recipe's boundaries for that many stages. Deterministic, so every rank builds the same
    program. Raises ValueError (a profile of other shapes, or of another model) or a
    ScheduleError."""
    path = recipe.parallel.profile
    profile = Profile.load(path)
    profile.check_shapes(recipe, path)
    if profile.micro_batch_size != recipe.train.micro_batch_size:
        raise ValueError(
            f"profile {path} measured micro-batches of {profile.micro_batch_size} samples, the recipe "
            f"has train.micro_batch_size={recipe.train.micro_batch_size}: use that size or profile "
            f"again (pp-ext tune --recipe R)"
        )
    chunks = recipe.parallel.chunks
    cuts = []
    for count in (1, 2) if chunks is None else (chunks,):
        try:
            cuts.append(profile.stage_costs(cut_by(pipe * count), recipe.parallel.expert))
        except ValueError:
            if chunks is not None or count == 1:
                raise
    return auto_schedule(pipe, recipe.parallel.micro_batches, cuts, memory_limit, chunks)
