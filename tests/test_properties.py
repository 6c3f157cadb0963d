"""Every registered schedule over a grid of sizes: it validates and dry-runs
without deadlock (buffered, and under NCCL's rules with both stream models), its
lowering is one global order of transfers, or it refuses with its stated constraint;
metrics equal the closed forms of SCHEDULES.md wherever they are exact."""

import subprocess
import sys
from fractions import Fraction as Fr

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nccl_recorder import one_global_order

from pp_ext.schedules import REGISTRY, ConstraintError, build, lower, simulate
from pp_ext.schedules.asynchronous import SHOWN_STEPS
from pp_ext.schedules.simulate import steady_state


def lower_bound(p, m, v):
    """Flushed bubble floor at unit costs (F = I = W = 1 per rank, chunk = 1/v)."""
    return Fr(p - 1, 3 * v * m + p - 1)


def closed_forms(name, p, m, v):
    """Exact (flushed) metrics from the literature, where a closed form exists."""
    if name in ("gpipe", "1f1b"):
        return {
            "bubble_ratio": Fr(p - 1, m + p - 1),
            "peak_activations": m if name == "gpipe" else min(p, m),
        }
    if name == "interleaved-1f1b" and m % p == 0:
        return {
            "bubble_ratio": Fr(p - 1, v * m + p - 1),
            "peak_activations": min(m, p + Fr(p - 1, v)),
        }
    if name == "looped-bfs" and m >= p:
        return {"bubble_ratio": Fr(p - 1, v * m + p - 1), "peak_activations": m}
    if name == "zb-h1":
        bubble = lower_bound(p, m, 1) if m >= p else 1 - Fr(3 * m, 2 * m + 2 * p - 1)
        return {"bubble_ratio": bubble, "peak_activations": min(m, p)}
    if (
        name == "auto" and v == 1
    ):  # unit costs, 1F1B's memory (p): zb-h1's bubble, optimal for these costs
        return {"bubble_ratio": closed_forms("zb-h1", p, m, v)["bubble_ratio"]}
    if name == "zb-h2" and m >= p:
        return {"bubble_ratio": lower_bound(p, m, 1), "peak_activations": min(m, 2 * p - 1)}
    if name == "zbv":
        return {"peak_activations": min(m, p)} | (
            {"bubble_ratio": lower_bound(p, m, 2)} if m >= 3 * p // 2 else {}
        )
    if name == "dualpipev":  # refuses m < 2p
        return {"bubble_ratio": lower_bound(p, m, 2), "peak_activations": p + Fr(1, 2)}
    if name in (
        "pipedream",
        "pipedream-2bw",
        "pipemare",
    ):  # a stream of SHOWN_STEPS calls, one fill
        return {
            "bubble_ratio": Fr(p - 1, SHOWN_STEPS * m + p - 1),
            "peak_activations": min(p, SHOWN_STEPS * m),
            "weight_copies": {"pipedream": p, "pipedream-2bw": 2, "pipemare": 1}[name],
        }
    if (
        name == "chimera"
    ):  # refuses odd p and m not a multiple of p; chimera.py's forms, test_chimera.py's check
        return {
            "bubble_ratio": Fr((p - 2) * (m + p), (4 * p - 2) * m + p * (p - 2)),
            "peak_activations": p,
            "weight_copies": 2,
        }
    return {}


# (name, smallest m as a function of p) where back-to-back steps leave no bubble
STEADY_ZERO = {
    "zb-h2": lambda p: 2 * p - 1,
    "zbv": lambda p: 2 * p - 1,
    "dualpipev": lambda p: 2 * p,
}


def check(name, p, m, v):
    spec = REGISTRY[name]
    try:
        sched = spec.build(p, m, v)  # validates: counts, order, lowering, dry run
    except ConstraintError as err:
        assert name in str(err) and "got" in str(err), (
            f"constraint message must name the schedule and value: {err}"
        )
        return None
    assert sched.ranks == p and sched.chunks == v
    assert sched.micro_batches == m * (SHOWN_STEPS if sched.backward_weights else 1)
    # the lowering's invariant, by a cycle search independent of the NCCL dry run that build ran
    assert one_global_order(lower(sched)), (name, p, m, v)
    sim = simulate(sched)
    for metric, value in closed_forms(name, p, m, v).items():
        assert getattr(sim, metric) == value, (name, p, m, v, metric, getattr(sim, metric), value)
    if name == "auto":  # built by name, auto keeps to 1F1B's memory limit of p micro-batches
        assert sim.peak_activations <= min(m, p), (p, m, sim.peak_activations)
    # no single-pipeline schedule beats the flushed lower bound
    if sched.placement.pipelines == 1:
        assert sim.bubble_ratio >= lower_bound(p, m, v)
    return sim


NAMES = sorted(REGISTRY)


@pytest.mark.parametrize("name", NAMES)
def test_small_grid_exhaustively(name):
    for p in range(1, 5):
        for m in range(1, 4 * p + 1):
            for v in range(1, 5):
                check(name, p, m, v)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_large_grid_sampled(name, data):
    p = data.draw(st.integers(5, 8), label="stages")
    m = data.draw(st.integers(1, 4 * p), label="micro_batches")
    v = data.draw(st.integers(1, 4), label="chunks")
    check(name, p, m, v)


@pytest.mark.parametrize("name", NAMES)
def test_default_chunks_build_at_the_issue_sizes(name):
    spec = REGISTRY[name]
    sched = spec.build(4, 8)
    assert sched.chunks == spec.default_chunks
    lowered = lower(sched)
    assert (
        sum(a.kind.is_comm for prog in lowered.programs for a in prog)
        == 2 * simulate(sched).messages
    )


@pytest.mark.parametrize("name", sorted(STEADY_ZERO))
@settings(max_examples=8, deadline=None)
@given(p=st.integers(2, 6), extra=st.integers(0, 6))
def test_zero_bubble_claims_in_steady_state(name, p, extra):
    m = STEADY_ZERO[name](p) + extra
    assert steady_state(build(name, p, m)).bubble_ratio == 0


@pytest.mark.slow  # starts a process: a fresh interpreter's modules
def test_schedule_layer_imports_neither_torch_nor_deepspeed():
    code = (
        "import sys, pp_ext.schedules; bad = {'torch', 'deepspeed'} & set(sys.modules); "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
