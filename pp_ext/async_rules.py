"""The update rules of the asynchronous schedules, once, as plain single-process training.

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

import torch
from torch import nn

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


class AsyncReference:
    """Single-process training of ``stages`` (modules, the last one's output goes to
    ``loss_fn``) under the rule of ``name``; ``optimizers[s]`` updates stage s."""

    def __init__(self, name: str, stages: list[nn.Module], loss_fn, optimizers: list[torch.optim.Optimizer],
                 micro_batches: int, pipemare: PipeMareOptions = PipeMareOptions()) -> None:
        if name not in NAMES:
            raise ValueError(f"no asynchronous rule named {name!r}: choose one of {', '.join(NAMES)}")
        self.name, self.stages, self.loss_fn, self.optimizers = name, stages, loss_fn, optimizers
        self.m, self.options = micro_batches, pipemare
        self.params = [list(s.parameters()) for s in stages]
        # per stage, the versions a coming micro-batch may still run at: version v is
        # history[s][v - first[s]]; older ones are dropped, so a long run holds at most
        # the rule's in-flight versions (p for pipedream, 2 for 2BW), as the engine does
        self.history = [[[p.detach().clone() for p in ps]] for ps in self.params]
        self.first = [0] * len(stages)
        self.delta = [[torch.zeros_like(p) for p in ps] for ps in self.params]
        self.g = 0

    def _weights(self, stage: int, tensors: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, t in zip(self.params[stage], tensors):
                p.copy_(t)

    def micro_batch(self, inputs, labels) -> float:
        """Forward and backward of the next micro-batch; updates where the rule says."""
        p, g = len(self.stages), self.g
        versions = [forward_version(self.name, p, s, self.m, g) for s in range(p)]
        xs, x = [], inputs
        with torch.no_grad():
            for s, stage in enumerate(self.stages):
                self._weights(s, self._version(s, versions[s]))
                xs.append(x)
                x = stage(x)
            loss = self.loss_fn(x, labels).item()
        grad = None
        scale = 1.0 / updates_per_group(self.name, self.m)
        for s in reversed(range(p)):
            weights = self._version(s, versions[s])
            if self.name == "pipemare":
                latest, delay = self.history[s][-1], self._latest(s) - versions[s]
                weights = [w - delay * d for w, d in zip(latest, self.delta[s])]
            self._weights(s, weights)
            x = xs[s]
            if torch.is_tensor(x):
                x = x.detach().requires_grad_(x.is_floating_point())
            elif s > 0:  # the first stage may take a tuple of inputs (ids, mask, positions)
                raise TypeError(f"stage {s} gets a {type(x).__name__}: the reference passes one tensor between stages")
            out = self.stages[s](x)
            if grad is None:
                (self.loss_fn(out, labels) * scale).backward()
            else:
                torch.autograd.backward(out, grad)
            grad = x.grad if s > 0 else None
        self.g += 1
        if self.g % updates_per_group(self.name, self.m) == 0:
            for s in range(p):
                self._update(s)
        return loss

    def _update(self, s: int) -> None:
        latest = self.history[s][-1]
        self._weights(s, latest)
        delay = len(self.stages) - 1 - s
        factor = lr_factor(self._latest(s), delay, self.options) if self.name == "pipemare" else 1.0
        groups = self.optimizers[s].param_groups
        lrs = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] *= factor
        self.optimizers[s].step()
        for group, lr in zip(groups, lrs):
            group["lr"] = lr
        self.optimizers[s].zero_grad()
        new = [p.detach().clone() for p in self.params[s]]
        if self.name == "pipemare" and delay >= 1:
            gamma = correction_decay(delay, self.options)
            self.delta[s] = [gamma * d + (1 - gamma) * (n - o) for d, n, o in zip(self.delta[s], new, latest)]
        self.history[s].append(new)
        # micro-batch g runs at versions that never decrease with g: keep from the next one's
        keep = forward_version(self.name, len(self.stages), s, self.m, self.g)
        del self.history[s][:keep - self.first[s]]
        self.first[s] = keep

    def _latest(self, s: int) -> int:
        return self.first[s] + len(self.history[s]) - 1

    def _version(self, s: int, version: int) -> list[torch.Tensor]:
        return self.history[s][version - self.first[s]]
