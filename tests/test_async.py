"""Asynchronous schedules: the pure stream (calls and drains, weight versions) and, on the
engine, each schedule equal to its own single-process rule (pp_ext.schedules.async_rules)
within 1e-5 over 10 calls and a flush, p = 2 and p = 4 (one launch each), their calls
recorded on plain gloo and replayed to the end under NCCL's stream models."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
from async_cases import batch, launch

from pp_ext.schedules import Costs, simulate
from pp_ext.schedules.asynchronous import (
    CALLS_SEARCHED,
    SHOWN_STEPS,
    calls,
    lowered_stream,
    steady_call,
    stream,
)

NAMES = ("pipedream", "pipedream-2bw", "pipemare")


def sizes(name: str):
    """(p, m) up to p = 5 that ``name`` accepts."""
    for p in range(1, 6):
        for m in range(max(1, p - 1), 2 * p + 2):
            if name != "pipedream-2bw" or m >= p:
                yield p, m


@pytest.mark.parametrize("name", NAMES)
def test_the_calls_and_the_drain_run_exactly_the_lowered_stream_of_that_many_calls(name):
    """What the engine runs for c calls then flush() (Calls.call(0 .. c-1), then
    Calls.drain(c)) is the lowered stream of c calls, on every rank, also for c past the
    calls searched for the periodic regime; so it is NCCL-safe as lowering proves."""
    for p, m in sizes(name):
        if p > 4:
            continue
        cut = [calls(stream(name, p, m, SHOWN_STEPS), m, rank) for rank in range(p)]
        for c in (1, 2, 3, CALLS_SEARCHED + 2):
            want = lowered_stream(name, p, m, c)
            for rank in range(p):
                ran = sum((cut[rank].call(n) for n in range(c)), ()) + cut[rank].drain(c)
                assert ran == want.programs[rank], (name, p, m, rank, c)


@pytest.mark.parametrize(
    "name,versions",
    [("pipedream", lambda p: p), ("pipedream-2bw", lambda p: 2), ("pipemare", lambda p: 1)],
)
def test_weight_versions_held(name, versions):
    for p in range(2, 7):
        sim = simulate(stream(name, p, p, SHOWN_STEPS))
        assert sim.weight_copies == versions(p), (name, p, sim.weight_copies)
        assert sim.peak_activations == p


@pytest.mark.parametrize("name", NAMES)
def test_a_steady_call_is_the_streams_time_per_call(name):
    # uniform costs: no bubble once full, m * (F + B) + updates * U a call; S calls take
    # (S*m + p-1) * (F + B) without updates (the 1F1B bubble (p-1)/(S*m+p-1))
    for p, m in sizes(name):
        updates = 1 if name == "pipedream-2bw" else m
        assert steady_call(name, p, m, Costs(update=Fraction(1, 3))) == 3 * m + Fraction(
            updates, 3
        ), (p, m)
        assert simulate(stream(name, p, m, 2)).makespan == (2 * m + p - 1) * 3
    # unequal stages, comm and updates: the growth per call of a much longer stream; on
    # the last costs pipedream and pipemare settle only after 6 calls
    rng = random.Random(7)

    def third(top: int) -> Fraction:
        return Fraction(rng.randint(1, top), 3)

    cases = [
        (
            p,
            m,
            Costs(
                comm=Fraction(rng.randint(0, 5), 10),
                update=third(4),
                per_stage=tuple((third(9), third(9), third(9), third(19)) for _ in range(p)),
            ),
        )
        for p, m in ((2, 4), (3, 3), (4, 4), (5, 7))
    ]
    cases.append(
        (
            5,
            4,
            Costs(
                comm=Fraction(1, 10),
                update=1,
                per_stage=tuple(
                    tuple(map(Fraction, stage.split()))
                    for stage in (
                        "1 1 1/3 2",
                        "3 4/3 5/3 16/3",
                        "5/3 8/3 8/3 5",
                        "1/3 2/3 4/3 14/3",
                        "7/3 4/3 2 17/3",
                    )
                ),
            ),
        )
    )
    for p, m, costs in cases:
        long = [simulate(stream(name, p, m, calls), costs).makespan for calls in (24, 28)]
        assert steady_call(name, p, m, costs) == (long[1] - long[0]) / 4, (p, m)


@pytest.mark.slow
def test_pipeline_2_each_async_schedule_equals_its_rule():
    launch(
        2, [(name, m) for name in NAMES for m in (2, 3)] + [(name, 2, "adamw") for name in NAMES]
    )


@pytest.mark.slow
def test_pipeline_4_each_async_schedule_equals_its_rule():
    launch(4, [(name, m) for name in NAMES for m in (4, 5)])


def test_the_rules_differ_so_the_engine_comparison_can_fail():
    """Each rule trains differently from the others (and from synchronous 1F1B, whose
    single version is pipedream at p = 1): an engine running the wrong rule would fail."""
    import torch
    from torch import nn

    from pp_ext.schedules.async_rules import PipeMareOptions
    from pp_ext.testing.async_reference import AsyncReference
    from pp_ext.testing.reference import SequentialReference
    from pp_ext.testing.tiny import TinyConfig, layer_specs, lm_loss

    config = TinyConfig(blocks=2, tied=False)
    finals = {}
    for name in NAMES:
        reference = SequentialReference(layer_specs(config), lm_loss, base_seed=1234)
        layers = reference.layers
        stages = [
            nn.Sequential(*layers[:2]),
            nn.Sequential(*layers[2:3]),
            nn.Sequential(*layers[3:]),
        ]
        rule = AsyncReference(
            name,
            stages,
            lm_loss,
            [torch.optim.SGD(s.parameters(), lr=0.05) for s in stages],
            3,
            PipeMareOptions(lr_warmup=5),
        )
        for g in range(12):
            rule.micro_batch(*batch(g, config.vocab))
        finals[name] = torch.cat([p.detach().flatten() for p in reference.parameters()])
    for a in NAMES:
        for b in NAMES:
            if a < b:
                assert float((finals[a] - finals[b]).abs().max()) > 1e-4, (a, b)


def test_2bw_rule_without_its_delay_is_synchronous_training(monkeypatch):
    """What separates pipedream-2bw from synchronous training is the delay of one
    version alone: with forwards at the latest version instead of W(t-1), its rule
    (mean gradient of m micro-batches, one AdamW step per batch) is ordinary
    gradient-accumulation training, equal within float rounding. (On the quickstart
    that one-step delay is what slows 2BW under AdamW: see README.)"""
    import torch
    from torch import nn

    from pp_ext.schedules import async_rules
    from pp_ext.testing.async_reference import AsyncReference
    from pp_ext.testing.reference import SequentialReference
    from pp_ext.testing.tiny import TinyConfig, layer_specs, lm_loss

    config, m = TinyConfig(blocks=2, tied=False), 3
    sync = SequentialReference(layer_specs(config), lm_loss, base_seed=1234)
    optimizer = torch.optim.AdamW(sync.parameters(), lr=0.01)
    expected = []
    for n in range(4):
        total = 0.0
        for k in range(m):
            loss = sync.loss(*batch(n * m + k, config.vocab))
            total += float(loss.detach())
            (loss / m).backward()
        expected.append(total / m)
        optimizer.step()
        optimizer.zero_grad()

    def losses(delayed: bool) -> tuple[list[float], torch.Tensor]:
        if not delayed:
            monkeypatch.setattr(async_rules, "forward_version", lambda name, p, s, m, g: g // m)
        reference = SequentialReference(layer_specs(config), lm_loss, base_seed=1234)
        stages = [nn.Sequential(*reference.layers[:3]), nn.Sequential(*reference.layers[3:])]
        rule = AsyncReference(
            "pipedream-2bw",
            stages,
            lm_loss,
            [torch.optim.AdamW(s.parameters(), lr=0.01) for s in stages],
            m,
        )
        out = [
            sum(rule.micro_batch(*batch(n * m + k, config.vocab)) for k in range(m)) / m
            for n in range(4)
        ]
        return out, torch.cat([p.detach().flatten() for p in reference.parameters()])

    undelayed, weights = losses(delayed=False)
    assert max(abs(a - b) for a, b in zip(undelayed, expected)) < 1e-5
    assert (
        float((weights - torch.cat([p.detach().flatten() for p in sync.parameters()])).abs().max())
        < 1e-5
    )
    monkeypatch.undo()
    delayed, _ = losses(delayed=True)
    assert abs(delayed[-1] - expected[-1]) > 1e-4  # the delay does change training


def run_two_engines(rank: int, world: int) -> dict:
    """An asynchronous engine between calls, and another engine on the same ranks."""
    import torch

    import pp_ext
    from pp_ext.engine.module import ChunkedPipelineModule
    from pp_ext.testing.tiny import TinyConfig, layer_specs, lm_loss

    config = TinyConfig(blocks=world, tied=False)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 4,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
    }

    def engine(name):
        module = ChunkedPipelineModule(
            layers=layer_specs(config),
            num_stages=world,
            loss_fn=lm_loss,
            partition_method="uniform",
            seed_layers=True,
            base_seed=1234,
        )
        return pp_ext.initialize(
            model=module,
            optimizer=torch.optim.SGD(module.parameters(), lr=0.05),
            config=ds_config,
            schedule=name,
        )[0]

    data = [batch(k, config.vocab) for k in range(2)]
    stream, other = engine("pipedream"), engine("1f1b")
    stream.train_batch(iter(data))
    refused = []
    for run in (lambda: other.train_batch(iter(data)), lambda: other.eval_batch(iter(data))):
        try:
            run()
        except RuntimeError as err:
            refused.append(str(err))
    stream.flush()
    after_flush = float(other.train_batch(iter(data)))
    stream.train_batch(iter(data))  # the stream starts again, then drains
    stream.flush()
    return {"refused": refused, "after_flush": after_flush}


@pytest.mark.slow
def test_another_engine_is_refused_while_an_asynchronous_one_is_in_flight():
    """Messages between two ranks match in posting order: a second engine's would meet
    the asynchronous engine's in-flight gradients and hang; it gets an error instead,
    on every rank, and runs once the stream is flushed."""
    from pp_ext.testing.spawn import spawn

    for result in spawn(run_two_engines, 2):
        assert len(result["refused"]) == 2, result
        for message in result["refused"]:
            assert (
                message.startswith("schedule pipedream still has micro-batches in flight")
                and "flush()" in message
            )
        assert math.isfinite(result["after_flush"])


@pytest.mark.slow  # launches the study's training processes
def test_the_delay_study_trains_the_recipe_by_the_2bw_rule_and_ordinarily():
    """launch/delay_study.py (the README's whole-model study): both runs, same first
    loss (same weights and data before any update), and one line for bad input."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    command = [
        sys.executable,
        "launch/delay_study.py",
        "--recipe",
        "recipes/quickstart.yaml",
        "model.path=configs/models/quickstart-untied",
        "model.tokenizer=configs/models/quickstart",
        "train.steps=3",
        "train.grad_clip=0",
    ]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    first = {
        line.split(" step 1:")[0]: line.split("loss ")[1]
        for line in done.stdout.splitlines()
        if " step 1:" in line
    }
    assert set(first) == {"ordinary", "2bw rule"} and first["ordinary"] == first["2bw rule"]
    assert [line.split(":")[0] for line in done.stdout.splitlines() if "last-10" in line] == [
        "ordinary",
        "2bw rule",
    ]
    for override, message in (
        ("train.stepz=1", "'train.stepz' does not exist"),
        ("train.grad_clip=1.0", "set train.grad_clip=0"),
    ):
        bad = subprocess.run(
            [*command, override], cwd=root, capture_output=True, text=True, timeout=300
        )
        assert bad.returncode == 2 and message in bad.stderr.strip().splitlines()[-1], bad.stderr[
            -500:
        ]
