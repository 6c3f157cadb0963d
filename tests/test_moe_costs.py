"""MoE costs (issue 24 item 5): the all-to-alls of expert parallelism priced as
communication in a profile's stage F and I (pp_ext/schedules/cost_model.py), so that the
simulator, ``auto`` and ``pp-ext tune``'s search see them; the profiler measures an MoE
recipe's layers, their routed bytes and the all-to-all fit (one slow 2-rank launch)."""

import dataclasses
import json
from types import SimpleNamespace

import pytest

from pp_ext.planning.memory import StateBytes
from pp_ext.planning.search import profiled_auto, search
from pp_ext.schedules.auto import auto_schedule
from pp_ext.schedules.cost_model import LayerCost, Profile


def layer(f, i, w, routed=0):
    return LayerCost("L", f, i, w, i + w, 10, 100, routed)


# a dense layer, two MoE layers handing their experts 8000 bytes, a dense head;
# an all-to-all of 1 ms latency and 1e6 bytes/s
PROFILE = Profile(
    (layer(1.0, 0.5, 0.4), layer(2.0, 1.0, 0.8, 8000), layer(2.0, 1.0, 0.8, 8000), layer(1, 1, 1)),
    0.01,
    1,
    8,
    alltoall_latency=1e-3,
    alltoall_bandwidth=1e6,
)


def test_the_all_to_alls_are_priced_by_hand():
    """By hand at E = 4: each rows exchange sends 3/4 of 8000 bytes off the rank,
    1e-3 + 6000 / 1e6 = 7e-3 s; F waits for the counts (1e-3) and two rows exchanges,
    I (and the fused B) for two; W for none. E = 2: 1e-3 + 4000 / 1e6 = 5e-3 s."""
    dense, moe = PROFILE.layers[0], PROFILE.layers[1]
    assert PROFILE.dispatch_seconds(moe, 4) == pytest.approx((0.015, 0.014), abs=1e-12)
    assert PROFILE.dispatch_seconds(moe, 2) == pytest.approx((0.011, 0.010), abs=1e-12)
    assert PROFILE.dispatch_seconds(moe, 1) == (0.0, 0.0)
    assert PROFILE.dispatch_seconds(dense, 4) == (0.0, 0.0)


def test_a_stage_with_experts_is_slower_by_exactly_its_all_to_alls():
    """Stage F, I and B grow by the priced amount per MoE layer they hold, W not at all;
    E = 1 gives the measured sums."""
    parts = [0, 1, 3, 4]  # MoE layers 1 and 2 both on stage 1
    one, four = PROFILE.stage_costs(parts), PROFILE.stage_costs(parts, 4)
    assert one.per_stage[1] == pytest.approx((4.0, 2.0, 1.6, 3.6))
    extra = [(0, 0, 0, 0), (2 * 0.015, 2 * 0.014, 0, 2 * 0.014), (0, 0, 0, 0)]
    for stage, (a, b) in enumerate(zip(four.per_stage, one.per_stage)):
        assert [x - y for x, y in zip(a, b)] == pytest.approx(extra[stage], abs=1e-12)
    assert four.comm == one.comm and four.replica_reduce == one.replica_reduce
    with pytest.raises(ValueError, match="expert parallelism takes >= 1 rank, got 0"):
        PROFILE.stage_costs(parts, 0)


def test_profile_files_keep_the_all_to_all_and_old_ones_price_it_at_0(tmp_path):
    assert Profile.load(PROFILE.save(tmp_path / "p.json")) == PROFILE
    unmeasurable = dataclasses.replace(PROFILE, alltoall_bandwidth=float("inf"))
    assert Profile.load(unmeasurable.save(tmp_path / "inf.json")) == unmeasurable  # null
    # written before the fields existed: without the fit, without the routed bytes, or both
    for fit, routed in ((True, False), (False, True), (True, True)):
        old = json.loads(PROFILE.save(tmp_path / "p.json").read_text())
        for key in ("alltoall_latency", "alltoall_bandwidth") if fit else ():
            del old[key]
        for entry in old["layers"] if routed else ():
            del entry["routed_bytes"]
        (tmp_path / "old.json").write_text(json.dumps(old))
        loaded = Profile.load(tmp_path / "old.json")
        assert loaded.stage_costs([0, 2, 4], 4) == PROFILE.stage_costs([0, 2, 4])


# pipe 2, 4 micro-batches, memory for all of them. Layers (F, I, W): L0 and L1 (1, 1, 1),
# L2 and L3 (e, e, e); L1 and L2 are MoE, each rows exchange at E = 2 takes
# R / 2 / bandwidth = 0.9 s (latency 0), so each adds a = b = 1.8 s to F and to I.
# Loop cut [0, 2, 4]: rank 0 holds L0 + L1, rank 1 L2 + L3. V cut [0, 1, 2, 3, 4]: rank 0
# holds L0 and L3, rank 1 L1 and L2.
# E = 1: loop >= rank 0's work, 4 x 6 = 24 s; a V schedule by hand (rank 0 runs its 4 F0
# back to back, rank 1 each F1 as it arrives, the e-passes between, then every I, then
# every W) ends near 14 s: auto takes V.
# E = 2: loop's rank 0 does 6 + a + b = 9.6 s per micro-batch and rank 1's round trip
# (a + b + 6e) is never longer than what rank 0 runs meanwhile, so 1F1B ends at 4 x 9.6 =
# 38.4 s; V's rank 1 works 3 + 3e + 2a + 2b = 10.23 s per micro-batch, >= 40.9 s: auto takes loop.
E = 0.01
AUTO = Profile(
    (layer(1, 1, 1), layer(1, 1, 1, 1800), layer(E, E, E, 1800), layer(E, E, E)),
    0.0,
    1,
    8,
    alltoall_latency=0.0,
    alltoall_bandwidth=1000.0,
)


def auto_chunks(expert: int) -> int:
    costs = [AUTO.stage_costs(cut, expert) for cut in ([0, 2, 4], [0, 1, 2, 3, 4])]
    return auto_schedule(2, 4, costs, memory_limit=4).placement.chunks


def test_auto_moves_the_moe_layers_apart_when_their_all_to_alls_are_dear(tmp_path):
    assert auto_chunks(1) == 2  # V: the heavy layers balanced
    assert auto_chunks(2) == 1  # loop: one MoE layer per rank
    # a recipe's auto from its profile prices at its parallel.expert
    path = AUTO.save(tmp_path / "auto.json")

    def recipe(expert: int):
        return SimpleNamespace(
            parallel=SimpleNamespace(profile=path, chunks=None, micro_batches=4, expert=expert),
            train=SimpleNamespace(micro_batch_size=1),
            data=SimpleNamespace(seq_len=8),
            model=SimpleNamespace(dtype="float32"),
        )

    def cut(stages: int) -> list[int]:
        return list(range(0, 5, 4 // stages))

    assert [profiled_auto(recipe(e), 2, cut, 4).placement.chunks for e in (1, 2)] == [2, 1]


def test_tune_search_prices_the_all_to_alls():
    """``pp-ext tune``'s search simulates each candidate at the recipe's expert count:
    1F1B on the loop cut takes rank 0's work, 4 x 6 = 24 s at E = 1 and the 38.4 s derived
    above at E = 2."""

    def one_f_one_b(expert: int) -> float:
        found, _ = search(
            {1: AUTO},
            [(0, 1)] * 4,
            lambda method, stages: [0, 2, 4] if stages == 2 else [0, 1, 2, 3, 4],
            2,
            4,
            StateBytes(4, 4, 8),
            None,
            expert,
        )
        return next(
            c.step_s for c in found if (c.schedule, c.partition) == ("1f1b", "parameters=uniform")
        )

    assert one_f_one_b(1) == pytest.approx(24.0)
    assert one_f_one_b(2) == pytest.approx(38.4)


@pytest.mark.slow  # one 2-rank launch profiling a tiny Qwen3-MoE recipe
def test_the_profiler_measures_an_moe_recipe(tmp_path):
    """Qwen3-MoE (a dense first layer, then two MoE layers; top 2 of 4 experts, hidden
    32) through ``pp-ext tune``'s profiler: every layer's passes measured, each MoE layer
    hands its experts 2 x 16 tokens x 2 x 32 floats of 4 bytes, the dense ones none, and
    the all-to-all between the two ranks is fitted; at E = 2 the MoE stage is slower."""
    from pathlib import Path

    import torch
    from hf_models import MOE_CONFIGS
    from transformers import AutoModelForCausalLM

    from pp_ext.bench.profiler import profile_recipe
    from pp_ext.config.recipe import load

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(MOE_CONFIGS["qwen3_moe"](False)).save_pretrained(
        tmp_path / "hf"
    )
    recipe = load(
        Path(__file__).resolve().parent.parent / "recipes/quickstart.yaml",
        [f"model.path={tmp_path / 'hf'}", "data.seq_len=16"],
    )
    profile = profile_recipe(recipe, (2,), repeats=1, ranks=2)[2]
    assert len(profile.layers) == 6 and all(
        layer.forward > 0 and layer.input_grad > 0 and layer.weight_grad > 0
        for layer in profile.layers[1:]
    )
    assert [layer.routed_bytes for layer in profile.layers] == [0, 0, 8192, 8192, 0, 0]
    assert profile.alltoall_latency > 0 and profile.alltoall_bandwidth > 0
    assert Profile.load(profile.save(tmp_path / "profile.json")) == profile
    one, two = profile.stage_costs([0, 2, 6]), profile.stage_costs([0, 2, 6], 2)
    assert two.per_stage[0] == one.per_stage[0] and two.per_stage[1][0] > one.per_stage[1][0]
