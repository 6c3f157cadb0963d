"""Chimera (Li & Hoefler 2021): the schedule's figures, its refusals, and (slow) the
engine's replica handling: identical replicas from different random starts,
gradient clipping over both replicas, checkpoint round trips."""
from fractions import Fraction as Fr

import pytest

from pp_ext.schedules import ConstraintError, Costs, build, simulate


@pytest.mark.parametrize("p", [2, 4, 6, 8])
@pytest.mark.parametrize("units", [1, 2, 3])
def test_paper_bubble_at_equal_forward_and_backward(p, units):
    # the paper's Table 2 counts F = B: bubble (p-2)/(2m+p-2) with direct concatenation
    m = units * p
    sim = simulate(build("chimera", p, m), Costs(forward=1, input_grad=Fr(1, 2), weight_grad=Fr(1, 2)))
    assert sim.makespan == 2 * m + p - 2
    assert sim.bubble_ratio == Fr(p - 2, 2 * m + p - 2)


@pytest.mark.parametrize("p", [2, 4, 6, 8])
def test_each_rank_runs_both_pipelines_and_peaks_in_the_papers_range(p):
    sched = build("chimera", p, 2 * p)
    sim = simulate(sched)
    assert sim.peak_activations_per_rank == tuple(p // 2 + 1 + min(r, p - 1 - r) for r in range(p))
    assert sched.pipeline_of == tuple(int(mb % p >= p // 2) for mb in range(2 * p))
    for rank, program in enumerate(sched.programs):
        # rank r: down stage r on chunk 0, up stage p-1-r on chunk 1, each micro-batch in order
        assert [sched.stage(rank, a) for a in program if a.chunk == 0][:1] == [rank]
        assert [sched.stage(rank, a) for a in program if a.chunk == 1][:1] == [p - 1 - rank]
        for chunk in (0, 1):
            forwards = [a.micro_batch for a in program if a.chunk == chunk and a.kind.value == "F"]
            assert forwards == sorted(forwards) and len(forwards) == p


@pytest.mark.parametrize("sizes, problem", [
    ((3, 6, 2), "even number of pipeline stages, got stages=3"),
    ((4, 6, 2), "multiple of stages=4 .* got micro_batches=6: use e.g. micro_batches=8"),
    ((4, 8, 1), "exactly 2 chunks per rank .* got chunks=1: use chunks=2"),
])
def test_refuses_with_one_clear_line(sizes, problem):
    with pytest.raises(ConstraintError, match=problem) as err:
        build("chimera", *sizes)
    assert "\n" not in str(err.value)
