"""The engine of the asynchronous schedules (:mod:`pp_ext.schedules.asynchronous`).

``train_batch`` runs one call of the rank's stream: call 0 the warm-up, every
later call the same steady program shifted by m micro-batches; activations and
gradients of the micro-batches in flight, and sends not yet received, stay across
calls. :meth:`AsyncScheduleEngine.flush` runs the drain; call it before
``eval_batch``, ``save_checkpoint`` and the end of training (they refuse otherwise).

Weights. Forwards run without a graph and keep only the chunk's input (and the
last stage's labels); a backward recomputes the chunk's forward from that input
at its backward weights, then back-propagates. With a stash (``pipedream``,
``pipedream-2bw``) the backward weights are its forward's version, so this is
exactly ordinary backprop at that version (the forward is deterministic); older
versions are kept as copies while a forward in flight or to come needs them.
PipeMare's backward takes the latest weights, corrected (``pp_ext.schedules.async_rules``).
``U`` reduces gradients over data parallelism and takes DeepSpeed's optimizer
step (one DeepSpeed step per update) on the mean gradient of the micro-batches
since the last update. :mod:`pp_ext.testing.async_reference` is the single-process reference.

fp32 only, no gradient clipping, no weights tied across ranks (each would need a
collective inside the program at a different moment on each rank).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from pp_ext.schedules import Kind, Schedule
from pp_ext.schedules.async_rules import PipeMareOptions, correction_decay, lr_factor
from pp_ext.schedules.asynchronous import calls

from . import instructions as ins
from . import p2p
from .engine import ScheduleEngine, with_location


class AsyncScheduleEngine(ScheduleEngine):
    def __init__(
        self,
        *args,
        schedule: Schedule,
        micro_batches: int,
        pipemare: PipeMareOptions = PipeMareOptions(),
        **kwargs,
    ) -> None:
        super().__init__(*args, schedule=schedule, **kwargs)
        if self.bfloat16_enabled() or self.zero_optimization():
            raise ValueError(
                f'schedule {schedule.name} runs in fp32 without ZeRO: drop "bf16" and '
                f'"zero_optimization" from the DeepSpeed config'
            )
        if self.gradient_clipping() > 0:
            raise ValueError(
                f"schedule {schedule.name} updates each stage on its own: set "
                f'"gradient_clipping": 0 (a global norm would need all ranks at once)'
            )
        if self.module.tied_comms:
            raise ValueError(
                f"schedule {schedule.name} updates each stage on its own: untie the weights "
                f"shared across pipeline ranks (e.g. tie_word_embeddings=false)"
            )
        self.m = micro_batches
        self.stream_calls = calls(schedule, micro_batches, self.stage_id)
        program = schedule.programs[self.stage_id]
        backwards, updates = (sum(a.kind is k for a in program) for k in (Kind.B, Kind.U))
        self.grad_scale = updates / backwards  # mean over the micro-batches of an update
        self.delay = schedule.stages - 1 - self.stage_id
        self.pipemare = pipemare
        self.updates_total = 0
        self._evaluating = False
        self._start_stream()

    def _start_stream(self) -> None:
        self.calls = 0
        self._updates: list[int] = []
        self._pinned: dict[tuple[int, int], int] = {}
        self._stash: dict[int, list[torch.Tensor]] = {}
        self._next_forward = 0
        self._delta = [torch.zeros_like(p) for p in self._params()]
        self._older_sends: list = []
        self._labels_of: dict[int, torch.Tensor | tuple[torch.Tensor, ...]] = {}
        super()._reset_buffers()
        p2p.hold_channels(self, False)

    def _params(self) -> list[torch.nn.Parameter]:
        return self.module.chunk_parameters(0)

    @property
    def in_flight(self) -> bool:
        return self.calls > 0

    # ------------------------------------------------------------------ calls

    def _reset_buffers(self) -> None:
        pass  # buffers outlive a call: the pipeline stays full

    def _train_schedule(self):
        actions = self.stream_calls.call(self.calls)
        self._call_start = self.calls * self.m
        self._batches = []  # the data iterator's micro-batches of this call
        self.calls += 1
        p2p.hold_channels(self, True)
        return ins.AsyncCall(self.schedule, self.stage_id, actions)

    def flush(self) -> None:
        """Drain the pipeline: the remaining backwards and updates; then every
        weight version but the latest is gone and the next call warms up again."""
        if not self.calls:
            return
        self._exec_schedule(
            ins.AsyncCall(self.schedule, self.stage_id, self.stream_calls.drain(self.calls))
        )
        for posted in self._older_sends + self._sends:
            posted.wait()
        self._start_stream()

    def _refuse_in_flight(self, what: str) -> None:
        if self.in_flight:
            raise RuntimeError(
                f"{what} with micro-batches in flight (schedule {self.schedule.name}): "
                f"call engine.flush() first"
            )

    def eval_batch(self, *args, **kwargs):
        """The synchronous engine's forward-only evaluation, at the current weights."""
        self._refuse_in_flight("eval_batch")
        self._evaluating = True
        try:
            return super().eval_batch(*args, **kwargs)
        finally:
            self._evaluating = False

    def save_checkpoint(self, *args, **kwargs):
        self._refuse_in_flight("save_checkpoint")
        return super().save_checkpoint(*args, **kwargs)

    # ------------------------------------------------------------------ weights

    @contextmanager
    def _weights(self, tensors: list[torch.Tensor] | None):
        """Run with the chunk's parameters holding ``tensors`` (None: as they are)."""
        if tensors is None:
            yield
            return
        params = self._params()
        saved = [p.data for p in params]
        for p, t in zip(params, tensors):
            p.data = t
        try:
            yield
        finally:
            for p, t in zip(params, saved):
                p.data = t

    def _version(self, version: int) -> list[torch.Tensor] | None:
        return None if version == len(self._updates) else self._stash[version]

    def _needed(self) -> set[int]:
        needed = {self.schedule.forward_version(self._updates, self._next_forward)}
        if self.schedule.backward_weights == "stashed":
            needed |= set(self._pinned.values())
        return needed

    def _backward_weights(self, version: int) -> list[torch.Tensor] | None:
        if self.schedule.backward_weights == "stashed":
            return self._version(version)
        lag = len(self._updates) - version  # PipeMare: the latest weights, corrected
        if not lag:
            return None
        return [p.detach() - lag * d for p, d in zip(self._params(), self._delta)]

    # ------------------------------------------------------------------ handlers

    def _exec_forward_chunk(self, chunk: int, micro_batch: int) -> None:
        if self._evaluating:  # no stream, no versions: an ordinary forward
            return ScheduleEngine._exec_forward_chunk(self, chunk, micro_batch)
        key, first, last = (
            (chunk, micro_batch),
            self.module.is_first_stage_chunk(chunk),
            self.module.is_last_stage_chunk(chunk),
        )
        batch = self._batch(micro_batch - self._call_start) if first or last else None
        inputs = (
            self._load_inputs(micro_batch - self._call_start)
            if first
            else self._received(key, grad=False).pop(key)
        )
        version = self.schedule.forward_version(self._updates, micro_batch)
        self._pinned[key] = version
        self._next_forward = micro_batch + 1
        with torch.no_grad(), self._weights(self._version(version)):
            outputs = self.module.chunk_forward(chunk, inputs[0] if len(inputs) == 1 else inputs)
            self._inputs[key] = inputs
            if last:
                assert batch is not None  # read above for the first and the last stage
                self._labels_of[micro_batch] = batch[1]
                loss = self.module.loss_fn(outputs, self._labels(micro_batch - self._call_start))
                self.fwd_outputs.append(loss)
                self.total_loss = (
                    loss.clone() if self.total_loss is None else self.total_loss + loss
                )
                return
        # activations sent on need a gradient back, as in a forward with a graph
        self._outputs[key] = tuple(
            t.requires_grad_(t.is_floating_point()) for t in p2p.as_tuple(outputs)
        )

    def _exec_backward_chunk(self, chunk: int, micro_batch: int) -> None:
        key = (chunk, micro_batch)
        version = self._pinned.pop(key)
        inputs = tuple(t.detach().requires_grad_(t.requires_grad) for t in self._inputs.pop(key))
        with self._weights(self._backward_weights(version)):
            outputs = self.module.chunk_forward(chunk, inputs[0] if len(inputs) == 1 else inputs)
            if self.module.is_last_stage_chunk(chunk):
                labels = self._labels_of.pop(micro_batch)
                labels = (
                    labels.to(self.device)
                    if torch.is_tensor(labels)
                    else tuple(t.to(self.device) for t in labels)
                )
                (self.module.loss_fn(outputs, labels) * self.grad_scale).backward()
            else:
                self._outputs.pop(key)
                grads = self._received(key, grad=True).pop(key)
                torch.autograd.backward(
                    [t for t in p2p.as_tuple(outputs) if t.requires_grad], grads
                )
        if not self.module.is_first_stage_chunk(chunk):
            self._input_grads[key] = tuple(
                t.grad if t.grad is not None else torch.zeros_like(t)
                for t in inputs
                if t.requires_grad
            )
        self._stash = {v: t for v, t in self._stash.items() if v in self._needed()}

    def _exec_update(self, chunk: int, micro_batch: int) -> None:
        current = len(self._updates)
        old = [p.detach().clone() for p in self._params()]
        self._updates.append(micro_batch)
        if current in self._needed():
            self._stash[current] = old
        corrected = self.schedule.backward_weights == "corrected"
        factor = lr_factor(self.updates_total, self.delay, self.pipemare) if corrected else 1.0
        groups = self.optimizer.param_groups
        lrs = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] *= factor
        self._exec_reduce_grads()
        self._exec_optimizer_step()
        for group, lr in zip(groups, lrs):
            if group["lr"] == lr * factor:  # no lr scheduler stepped it: put the plain lr back
                group["lr"] = lr
        self.updates_total += 1
        if corrected and self.delay >= 1:
            gamma = correction_decay(self.delay, self.pipemare)
            for d, p, o in zip(self._delta, self._params(), old):
                d.mul_(gamma).add_((p.detach() - o) * (1 - gamma))
        self._stash = {v: t for v, t in self._stash.items() if v in self._needed()}

    def _take_model_step(self, lr_kwargs):
        # DeepSpeed's own step: the synchronous engine's whole-model gradient norm is a
        # collective over all pipeline ranks, which reach their updates at different moments
        return DeepSpeedEngine._take_model_step(self, lr_kwargs)

    def _exec_finish_sends(self) -> None:
        # a call's last gradients are received in the next call: wait for the sends
        # of the call before, whose receivers have certainly posted them by now
        for posted in self._older_sends:
            posted.wait()
        self._older_sends, self._sends = self._sends, []

    _ASYNC_HANDLERS: dict[type, Callable] = {
        ins.ForwardChunk: _exec_forward_chunk,
        ins.BackwardChunk: _exec_backward_chunk,
        ins.Update: _exec_update,
        ins.FinishSends: _exec_finish_sends,
    }
    _INSTRUCTION_MAP = {
        **ScheduleEngine._INSTRUCTION_MAP,
        **{kind: with_location(kind.__name__, run) for kind, run in _ASYNC_HANDLERS.items()},
    }
