"""The asynchronous update rules (:mod:`pp_ext.schedules.async_rules`) as plain
single-process training: the reference the asynchronous engine is tested against."""

from __future__ import annotations

import torch
from torch import nn

from pp_ext.schedules import async_rules
from pp_ext.schedules.async_rules import PipeMareOptions


class AsyncReference:
    """Single-process training of ``stages`` (modules, the last one's output goes to
    ``loss_fn``) under the rule of ``name``; ``optimizers[s]`` updates stage s."""

    def __init__(
        self,
        name: str,
        stages: list[nn.Module],
        loss_fn,
        optimizers: list[torch.optim.Optimizer],
        micro_batches: int,
        pipemare: PipeMareOptions = PipeMareOptions(),
    ) -> None:
        if name not in async_rules.NAMES:
            raise ValueError(
                f"no asynchronous rule named {name!r}: choose one of {', '.join(async_rules.NAMES)}"
            )
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
        versions = [async_rules.forward_version(self.name, p, s, self.m, g) for s in range(p)]
        xs, x = [], inputs
        with torch.no_grad():
            for s, stage in enumerate(self.stages):
                self._weights(s, self._version(s, versions[s]))
                xs.append(x)
                x = stage(x)
            loss = self.loss_fn(x, labels).item()
        grad = None
        scale = 1.0 / async_rules.updates_per_group(self.name, self.m)
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
                raise TypeError(
                    f"stage {s} gets a {type(x).__name__}: the reference passes one tensor between stages"
                )
            out = self.stages[s](x)
            if grad is None:
                (self.loss_fn(out, labels) * scale).backward()
            else:
                torch.autograd.backward(out, grad)
            grad = x.grad if s > 0 else None
        self.g += 1
        if self.g % async_rules.updates_per_group(self.name, self.m) == 0:
            for s in range(p):
                self._update(s)
        return loss

    def _update(self, s: int) -> None:
        latest = self.history[s][-1]
        self._weights(s, latest)
        delay = len(self.stages) - 1 - s
        factor = (
            async_rules.lr_factor(self._latest(s), delay, self.options)
            if self.name == "pipemare"
            else 1.0
        )
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
            gamma = async_rules.correction_decay(delay, self.options)
            self.delta[s] = [
                gamma * d + (1 - gamma) * (n - o) for d, n, o in zip(self.delta[s], new, latest)
            ]
        self.history[s].append(new)
        # micro-batch g runs at versions that never decrease with g: keep from the next one's
        keep = async_rules.forward_version(self.name, len(self.stages), s, self.m, self.g)
        del self.history[s][: keep - self.first[s]]
        self.first[s] = keep

    def _latest(self, s: int) -> int:
        return self.first[s] + len(self.history[s]) - 1

    def _version(self, s: int, version: int) -> list[torch.Tensor]:
        return self.history[s][version - self.first[s]]
