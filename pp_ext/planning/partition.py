"""Partitioning, pure: layers cut into stages, stages placed on ranks, the cut that
balances measured costs. :func:`pp_ext.engine.module.partition` applies a recipe's
method to built layers (DeepSpeed's uniform and parameter-balanced cuts) and checks
explicit boundaries here."""

from __future__ import annotations

import bisect
import numbers
from collections.abc import Sequence

from pp_ext.schedules.placement import Placement

METHODS = "'parameters', 'uniform', 'type:REGEX' or a list of stage boundaries, or 'balanced:PROFILE.json'"


def check_boundaries(parts: Sequence[int], layers: int, stages: int) -> list[int]:
    if isinstance(parts, str) or not all(
        isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in parts
    ):
        raise ValueError(f"partition_method must be {METHODS}, got {parts!r}")
    parts = [int(b) for b in parts]
    if len(parts) != stages + 1:
        problem = f"has {len(parts)} boundaries, {stages} stages need {stages + 1}"
    elif parts[0] != 0 or parts[-1] != layers:
        problem = f"must start at 0 and end at the number of layers ({layers})"
    elif any(b <= a for a, b in zip(parts, parts[1:])):
        problem = "must be strictly increasing (every stage needs at least one layer)"
    else:
        return parts
    raise ValueError(f"explicit partition {parts} {problem}")


def balanced_parts(costs: Sequence[float], stages: int) -> list[int]:
    """Boundaries that minimise the most expensive stage's summed layer cost (every
    stage at least one layer), the smallest such spread among ties.

    A pipeline runs at the pace of its slowest stage (Qi et al. 2024, "Zero Bubble
    Pipeline Parallelism", ICLR, Sec. 3: bubbles and step time follow the per-stage
    F/I/W times), so the cut should bound the maximum; DeepSpeed's
    ``partition_balanced`` minimises max - min instead, which can leave the maximum
    higher. Measured costs include the embedding and the head (a large vocabulary
    makes the last layer the heaviest), so first and last stages come out uneven in
    layer count. Dynamic programming over prefix sums, O(layers^2 x stages).
    """
    n = len(costs)
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    # best[s][i]: (largest stage, sum of squares) of the first i layers in s stages
    best: list[list[tuple[float, float] | None]] = [[None] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for k in range(s - 1, i):
                below = best[s - 1][k]
                if below is None:
                    continue
                stage = prefix[i] - prefix[k]
                score = (max(below[0], stage), below[1] + stage * stage)
                here = best[s][i]
                if here is None or score < here:
                    best[s][i], cut[s][i] = score, k
    parts = [n]
    for s in range(stages, 0, -1):
        parts.append(cut[s][parts[-1]])
    return parts[::-1]


def chunk_layout(placement: Placement, parts: Sequence[int], rank: int) -> list[tuple[int, int]]:
    """``(start, stop)`` layer bounds of each chunk of ``rank``."""
    stages = [placement.holds(rank, chunk)[1] for chunk in range(placement.chunks)]
    return [(parts[s], parts[s + 1]) for s in stages]


def layer_stage(parts: Sequence[int], layer_idx: int) -> int:
    """Global stage that holds layer ``layer_idx``."""
    if not 0 <= layer_idx < parts[-1]:
        raise IndexError(f"layer {layer_idx} out of range: the model has {parts[-1]} layers")
    return bisect.bisect_right(parts, layer_idx) - 1


def layer_rank(placement: Placement, parts: Sequence[int], layer_idx: int) -> int:
    """Pipeline rank that holds layer ``layer_idx`` (what DeepSpeed calls its stage owner)."""
    return placement.locate(0, layer_stage(parts, layer_idx))[0]
