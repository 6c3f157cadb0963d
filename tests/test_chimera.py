"""Chimera (Li & Hoefler 2021): the schedule's figures, its refusals, and (slow) the
engine's replica handling: identical replicas from different random starts,
gradient clipping over both replicas, checkpoint round trips."""

from fractions import Fraction as Fr

import brute_force
import pytest

from pp_ext.schedules import ConstraintError, Costs, build, simulate


@pytest.mark.parametrize("p", [2, 4, 6, 8])
@pytest.mark.parametrize("units", [1, 2, 3])
def test_paper_bubble_at_equal_forward_and_backward(p, units):
    # the paper's Table 2 counts F = B: bubble (p-2)/(2m+p-2) with direct concatenation
    # (derived by hand in chimera.py from the slots of its order)
    m = units * p
    sched, costs = (
        build("chimera", p, m),
        Costs(forward=1, input_grad=Fr(1, 2), weight_grad=Fr(1, 2)),
    )
    sim = simulate(sched, costs)
    assert sim.makespan == 2 * m + p - 2 == brute_force.makespan(sched, costs)
    assert sim.bubble_ratio == Fr(p - 2, 2 * m + p - 2)


@pytest.mark.parametrize("p", [2, 4, 6, 8])
@pytest.mark.parametrize("units", [1, 2, 3])
def test_bubble_at_unit_costs_agrees_with_a_second_simulation(p, units):
    """F = I = W = 1 (so B = 2F): chimera.py's makespan (4p-2)m/p + p-2 has no derivation
    by hand; it is checked against tests/brute_force.py, a simulation independent of
    pp_ext.schedules.simulate, so a simulator bug cannot move formula and expectation
    together. test_properties.py then asserts the bubble over its whole grid."""
    m = units * p
    sched = build("chimera", p, m)
    makespan = Fr(4 * p - 2, p) * m + p - 2
    assert brute_force.makespan(sched) == makespan == simulate(sched).makespan
    bubble = Fr(
        (p - 2) * (m + p), (4 * p - 2) * m + p * (p - 2)
    )  # 1 - 3m / makespan, the form of chimera.py
    assert simulate(sched).bubble_ratio == 1 - Fr(3 * m, makespan) == bubble


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


@pytest.mark.parametrize(
    "sizes, problem",
    [
        ((3, 6, 2), "even number of pipeline stages, got stages=3"),
        ((4, 6, 2), "multiple of stages=4 .* got micro_batches=6: use e.g. micro_batches=8"),
        ((4, 8, 1), "exactly 2 chunks per rank .* got chunks=1: use chunks=2"),
    ],
)
def test_refuses_with_one_clear_line(sizes, problem):
    with pytest.raises(ConstraintError, match=problem) as err:
        build("chimera", *sizes)
    assert "\n" not in str(err.value)


# --- the engine: replicas on four ranks (one launch) --------------------------------------

STEPS, MICRO_BATCHES, CLIP, LR, TOLERANCE, PIPE = 3, 4, 0.05, 1.0, 1e-5, 4
# bf16 against the fp32 reference, step by step: bf16 keeps 8 significant bits, so the
# losses differ by up to 0.0175 (measured), more than three clipped steps move them
# (< 0.005): the loss cannot tell a skipped update. The optimizer's fp32 update can: it
# is compared with the reference's, relative to its size (measured 0.013; skipped: 1).
BF16_LOSS, BF16_UPDATE = 0.03, 0.05


def train_replicas(rank: int, world: int, ckpt_dir: str) -> dict:
    import torch
    from deepspeed import comm as dist
    from deepspeed.utils import safe_get_full_fp32_param
    from engine_cases import batch

    import pp_ext
    from pp_ext.engine.module import ChunkedPipelineModule
    from pp_ext.testing.reference import SequentialReference
    from pp_ext.testing.tiny import TinyConfig, layer_specs, lm_loss

    config = TinyConfig(blocks=4, tied=True)  # embedding, 4 blocks, norm, head: 7 layers
    # the last stage holds the norm too: a rank whose weights are all second copies (here a
    # lone tied head) gets no norm from DeepSpeed's bf16 optimizer (it stacks an empty list)
    specs = layer_specs(config)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": MICRO_BATCHES,
        "train_batch_size": 2 * MICRO_BATCHES,
        "steps_per_print": 10**9,
        "gradient_clipping": CLIP,
    }

    def engine(seed: int, **extra):
        torch.manual_seed(
            seed + rank
        )  # no per-layer seeds: each rank draws its replicas differently
        module = ChunkedPipelineModule(
            layers=specs,
            num_stages=PIPE,
            loss_fn=lm_loss,
            chunks=2,
            placement="bidirectional",
            partition_method=[0, 2, 3, 5, 7],
        )
        optimizer = torch.optim.SGD(module.parameters(), lr=LR, momentum=0.9)
        return module, pp_ext.initialize(
            model=module, optimizer=optimizer, config={**ds_config, **extra}, schedule="chimera"
        )[0]

    def step(eng, n: int) -> float:
        return float(
            eng.train_batch(iter([batch(n, 0, k, config.vocab) for k in range(MICRO_BATCHES)]))
        )

    module, eng = engine(0)
    starts = [None] * world
    dist.all_gather_object(starts, {name: t.clone() for name, t in module.state_dict().items()})
    start = {
        name: t for held in starts for name, t in held.items()
    }  # each stage from one of its replicas

    reference = SequentialReference(specs, lm_loss)
    reference.load_state_dict(start)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.9)
    ref_losses, norms = [], []
    for n in range(STEPS):
        ref_optimizer.zero_grad()
        losses = [
            reference.loss(*batch(n, 0, k, config.vocab)) / MICRO_BATCHES
            for k in range(MICRO_BATCHES)
        ]
        sum(losses).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)))
        ref_optimizer.step()
        ref_losses.append(float(sum(losses).detach()))

    losses = []
    for n in range(STEPS):
        losses.append(step(eng, n))
        if n == 0:
            eng.save_checkpoint(ckpt_dir, tag="one")
    ref_params = dict(reference.named_parameters())
    param_diff = max(
        float((p - ref_params[name]).detach().abs().max()) for name, p in module.named_parameters()
    )

    resumed, eng2 = engine(7)
    eng2.load_checkpoint(ckpt_dir, tag="one")
    resumed_losses = [step(eng2, n) for n in range(1, STEPS)]
    resumed_diff = max(
        float((p - dict(module.named_parameters())[name]).detach().abs().max())
        for name, p in resumed.named_parameters()
    )

    # eval_batch runs every micro-batch down the down pipeline: the mean loss of the trained model
    data = [batch(STEPS, 0, k, config.vocab) for k in range(MICRO_BATCHES)]
    eval_loss = float(eng.eval_batch(iter(data)))
    with torch.no_grad():
        ref_eval = float(sum(reference.loss(*b) for b in data) / MICRO_BATCHES)

    # bf16 (BF16_Optimizer, fp32 accumulators): the replicas' sums keep them bitwise equal
    low, eng3 = engine(0, bf16={"enabled": True})

    def masters() -> dict:  # the optimizer's fp32 weights (bf16 ones cannot show a step this small)
        return {
            name: safe_get_full_fp32_param(p).detach().clone() for name, p in low.named_parameters()
        }

    before = masters()
    bf16_losses = [step(eng3, n) for n in range(STEPS)]
    after = masters()
    # the bf16 run's update against the fp32 reference's, relative to the reference's
    wrong = sum(
        float((after[n] - before[n] - (ref_params[n] - start[n])).pow(2).sum().detach())
        for n in after
    )
    update = sum(float((ref_params[n] - start[n]).pow(2).sum().detach()) for n in after)
    ends = [None] * world
    dist.all_gather_object(ends, {name: t.float().clone() for name, t in low.state_dict().items()})
    end = {name: t for held in ends for name, t in held.items()}
    return {
        "replicas_equal": all(torch.equal(t, start[k]) for held in starts for k, t in held.items()),
        "losses": losses,
        "ref_losses": ref_losses,
        "norms": norms,
        "param_diff": param_diff,
        "resumed_losses": resumed_losses,
        "resumed_diff": resumed_diff,
        "eval": (eval_loss, ref_eval),
        "bf16_losses": bf16_losses,
        "bf16_update_error": (wrong / update) ** 0.5,
        "bf16_replicas_equal": all(
            torch.equal(t, end[k]) for held in ends for k, t in held.items()
        ),
    }


@pytest.mark.slow
def test_replicas_train_as_one_model_with_clipping_and_checkpoints(tmp_path):
    from pp_ext.testing.spawn import spawn

    results = spawn(train_replicas, PIPE, str(tmp_path), timeout=300)
    for r in results:
        assert r["replicas_equal"], "the up replicas must start from the down replicas' weights"
        assert min(r["norms"]) > CLIP, "the reference must clip, or clipping is not tested"
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"])) <= TOLERANCE, r
        assert r["param_diff"] <= TOLERANCE, r
        assert max(abs(a - b) for a, b in zip(r["resumed_losses"], r["losses"][1:])) <= TOLERANCE, r
        assert r["resumed_diff"] <= TOLERANCE, r
        assert abs(r["eval"][0] - r["eval"][1]) <= TOLERANCE, r["eval"]
        assert r["bf16_replicas_equal"]
        assert max(abs(a - b) for a, b in zip(r["bf16_losses"], r["ref_losses"])) <= BF16_LOSS, r
        assert r["bf16_update_error"] <= BF16_UPDATE, r
    # one file per stateful layer: each stage saved once, from its down replica
    layers = sorted(f.name for f in (tmp_path / "one").iterdir() if f.name.startswith("layer_"))
    assert layers == [f"layer_{i:02d}-model_states.pt" for i in range(6)], (
        layers
    )  # the tied head has none
