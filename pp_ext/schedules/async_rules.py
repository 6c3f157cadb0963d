"""The update rules of the asynchronous schedules, pure (the engine applies them;
:class:`pp_ext.testing.async_reference.AsyncReference` runs them as plain single-process training).

Each stage s of p keeps its own weights W_s and optimizer; micro-batch g (global
index; batch b = g // m) runs forward through every stage at the weights the rule
names, then backward (the stage's forward recomputed from its input at the
backward weights, then back-propagated: what the engine does, and for a stash
exactly ordinary backprop). w_s = p - 1 - s is the stage's 1F1B delay in
micro-batches (:mod:`pp_ext.schedules.asynchronous`).

- ``pipedream`` (Narayanan et al. 2019, Sec. 3.3): one update per micro-batch on
  its own gradient; forward and backward of g on stage s at version max(0, g - w_s).
- ``pipedream-2bw`` (Narayanan et al. 2021, ICML, Sec. 3.1): one update per batch
  on the mean gradient of its m micro-batches; batch b at version max(0, b - 1):
  W(b+1) = W(b) - lr * grad f(W(b-1)).
- ``pipemare`` (Yang et al. 2021, "PipeMare", MLSys): one update per micro-batch;
  forward at version vF = max(0, g - w_s), backward at the latest version g
  corrected for the discrepancy, W_s(g) - (g - vF) * delta_s, where delta_s is the
  moving average of the stage's updates, delta <- gamma*delta + (1-gamma)*(W_new - W_old),
  gamma_s = D**(1/w_s) (Technique 2, discrepancy correction); the stage's step size
  at its k-th update is lr_k * w_s**-(1 - min(k/K, 1)) (Technique 1, learning-rate
  rescheduling: a step inversely proportional to the delay at first, the plain
  lr after K updates). The last stage (w_s = 0) is synchronous and unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

NAMES = ("pipedream", "pipedream-2bw", "pipemare")


@dataclass(frozen=True)
class PipeMareOptions:
    """PipeMare's two hyper-parameters: ``lr_warmup`` K (updates until the rescheduled
    step size reaches the plain one; 0 turns Technique 1 off) and ``decay`` D of the
    discrepancy correction's moving average (gamma_s = D**(1/w_s); 1 turns it off)."""

    lr_warmup: int = 100
    decay: float = 0.1


def updates_per_group(name: str, micro_batches: int) -> int:
    return micro_batches if name == "pipedream-2bw" else 1


def forward_version(name: str, stages: int, stage: int, micro_batches: int, g: int) -> int:
    if name == "pipedream-2bw":
        return max(0, g // micro_batches - 1)
    return max(0, g - (stages - 1 - stage))


def lr_factor(update: int, delay: int, options: PipeMareOptions) -> float:
    """Technique 1: tau**-(1 - min(k/K, 1)) for a stage of delay tau >= 1."""
    if delay < 1 or options.lr_warmup <= 0:
        return 1.0
    return float(delay) ** -(1.0 - min(update / options.lr_warmup, 1.0))


def correction_decay(delay: int, options: PipeMareOptions) -> float:
    return options.decay ** (1.0 / delay)
