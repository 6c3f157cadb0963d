"""The pp-ext engine: a DeepSpeed ``PipelineEngine`` that runs any lowered program.

The engine knows actions, never schedule names: it is built with a validated,
lowered :class:`~pp_ext.schedules.Schedule` and executes this rank's program as
DeepSpeed instructions (:mod:`pp_ext.engine.instructions`). Everything else is
DeepSpeed's own: configuration, optimizer and ZeRO-1 wrapping, data iterator,
gradient reduction over data parallelism, tied-weight reduction, loss
aggregation, checkpoints.

Buffers are keyed by (chunk, micro-batch): ``_inputs`` (loaded, received or
handed over from another chunk of this rank), ``_outputs`` (a chunk's outputs,
or the loss on the last stage), ``_grads`` (output gradients received or handed
over) and ``_input_grads`` (gradients waiting to be sent back). The split
backward defers linear layers' weight GEMMs from I to W through a
:class:`~pp_ext.engine.split_backward.WeightGradStore`.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine

from pp_ext.schedules import Schedule

from . import instructions as ins
from . import p2p
from .module import ChunkedPipelineModule
from .split_backward import WeightGradStore, enable_split_backward


class ScheduleEngine(PipelineEngine):
    """Runs ``schedule`` (lowered, validated; see :func:`pp_ext.initialize`) on a
    :class:`ChunkedPipelineModule` whose placement and chunks match it."""

    def __init__(self, *args, schedule: Schedule, **kwargs) -> None:
        self._loss_rank = None  # DeepSpeed's __init__ asks is_last_stage() in its own sense first
        super().__init__(*args, **kwargs)
        module = self.module
        if not isinstance(module, ChunkedPipelineModule):
            raise TypeError("the pp-ext engine needs a pp_ext ChunkedPipelineModule")
        if (module.placement.name, module.chunks) != (schedule.placement.name, schedule.chunks) \
                or schedule.ranks != self.num_stages:
            raise ValueError(
                f"schedule {schedule.name} wants {schedule.ranks} ranks x {schedule.chunks} chunks in "
                f"{schedule.placement.name} placement; the module has {self.num_stages} x {module.chunks} in "
                f"{module.placement.name}: build the module with chunks={schedule.chunks}, "
                f"placement='{schedule.placement.name}'")
        if schedule.micro_batches != self.micro_batches:
            raise ValueError(f"schedule has {schedule.micro_batches} micro-batches, DeepSpeed's "
                             f"gradient_accumulation_steps is {self.micro_batches}: make them equal")
        if self.using_bf16_optimizer or self.fp16_enabled():
            raise NotImplementedError("the pp-ext engine runs fp32 for now (bf16 and fp16: next step); "
                                      "use the deepspeed-1f1b schedule for mixed precision")
        self.schedule = schedule
        self.placement = schedule.placement
        self._loss_rank = self.placement.locate(0, schedule.stages - 1)[0]
        self.store = WeightGradStore()
        if schedule.split_backward:
            enable_split_backward(self.module, self.store)
        self._header_cache: dict[int, list[p2p.TensorSpec]] = {}  # stage boundary -> specs
        self._reset_buffers()

    # ------------------------------------------------------------------ topology

    def is_last_stage(self) -> bool:
        """True on the rank that holds the last stage (and computes the loss)."""
        if self._loss_rank is None:
            return super().is_last_stage()
        return self.stage_id == self._loss_rank

    def _loss_stage_global_rank(self) -> int:
        return self.grid.stage_to_global(stage_id=self._loss_rank)

    def _global(self, pipeline_rank: int) -> int:
        return self.grid.stage_to_global(stage_id=pipeline_rank)

    def _neighbour(self, chunk: int, offset: int) -> tuple[int, int] | None:
        """(pipeline rank, chunk) of the stage ``offset`` away from ``chunk``'s."""
        stage = self.module.stage_of_chunk(chunk) + offset
        if not 0 <= stage < self.schedule.stages:
            return None
        return self.placement.locate(0, stage)

    # ------------------------------------------------------------------ step

    def _reset_buffers(self) -> None:
        self._inputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._outputs: dict[tuple[int, int], tuple[torch.Tensor, ...] | torch.Tensor] = {}
        self._grads: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._input_grads: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._batches: list = []
        self._sends: list = []

    def reset_activation_shape(self) -> None:
        super().reset_activation_shape()
        self._header_cache.clear()

    def _train_schedule(self):
        self._reset_buffers()
        return ins.ProgramSchedule(self.schedule, self.stage_id)

    def _batch(self, micro_batch: int):
        # the data iterator yields micro-batches in order; ranks holding the first
        # or the last stage read all of them, as DeepSpeed's TrainSchedule does
        while len(self._batches) <= micro_batch:
            self._batches.append(self._next_batch())
        return self._batches[micro_batch]

    def _load_inputs(self, micro_batch: int) -> tuple[torch.Tensor, ...]:
        grad = self._reentrant_activation_checkpointing()
        loaded = []
        for t in p2p.as_tuple(self._batch(micro_batch)[0]):
            t = t.detach().to(self.device).clone()
            t.requires_grad = grad and t.is_floating_point()
            loaded.append(t)
        return tuple(loaded)

    def _labels(self, micro_batch: int):
        labels = self._batch(micro_batch)[1]
        if torch.is_tensor(labels):
            return labels.to(self.device)
        return tuple(t.to(self.device) for t in labels)

    # ------------------------------------------------------------------ handlers

    def _exec_forward_chunk(self, chunk: int, micro_batch: int) -> None:
        key = (chunk, micro_batch)
        first, last = self.module.is_first_stage_chunk(chunk), self.module.is_last_stage_chunk(chunk)
        inputs = self._load_inputs(micro_batch) if first else self._inputs[key]
        self._inputs[key] = inputs
        outputs = self.module.chunk_forward(chunk, inputs[0] if len(inputs) == 1 else inputs)
        if last:
            loss = self.module.loss_fn(outputs, self._labels(micro_batch)) if self.module.loss_fn else outputs
            self._outputs[key] = loss
            self.fwd_outputs.append(loss.detach())
            self.total_loss = loss.detach().clone() if self.total_loss is None else self.total_loss + loss.detach()
            return
        self._outputs[key] = outputs
        rank, next_chunk = self._neighbour(chunk, +1)
        if rank == self.stage_id:  # the turn of a V: hand the activation over, cut the graph
            self._inputs[(next_chunk, micro_batch)] = tuple(
                t.detach().requires_grad_(t.requires_grad) for t in p2p.as_tuple(outputs))

    def _backward(self, chunk: int, micro_batch: int, split: bool) -> None:
        key = (chunk, micro_batch)
        outputs = self._outputs.pop(key)
        with self.store.defer(key) if split else nullcontext():
            if self.module.is_last_stage_chunk(chunk):
                # PipelineEngine.backward refuses outside train_batch; DeepSpeed's own
                # pipeline calls the DeepSpeedEngine one too (it scales by accumulation steps)
                DeepSpeedEngine.backward(self, outputs)
            else:
                grads = self._grads.pop(key)
                tensors = [t for t in p2p.as_tuple(outputs) if t.requires_grad]
                self._running_engine_backward = True
                try:
                    torch.autograd.backward(tensors, grads)
                finally:
                    self._running_engine_backward = False
        if not self.module.is_first_stage_chunk(chunk):
            grads = tuple(t.grad if t.grad is not None else torch.zeros_like(t)
                          for t in self._inputs[key] if t.requires_grad)
            rank, prev_chunk = self._neighbour(chunk, -1)
            if rank == self.stage_id:
                self._grads[(prev_chunk, micro_batch)] = grads
            else:
                self._input_grads[key] = grads
        if not split:
            del self._inputs[key]

    def _exec_backward_chunk(self, chunk: int, micro_batch: int) -> None:
        self._backward(chunk, micro_batch, split=False)

    def _exec_input_grad_chunk(self, chunk: int, micro_batch: int) -> None:
        self._backward(chunk, micro_batch, split=True)

    def _exec_weight_grad_chunk(self, chunk: int, micro_batch: int) -> None:
        key = (chunk, micro_batch)
        self.store.run(key)
        del self._inputs[key]  # the saved inputs of the linear layers are free now

    def _exec_send_tensors(self, chunk: int, micro_batch: int, peer: int, grad: bool) -> None:
        key = (chunk, micro_batch)
        dst = self._global(peer)
        if grad:
            tensors = self._input_grads.pop(key)
        else:
            tensors = p2p.as_tuple(self._outputs[key])
            boundary = self.module.stage_of_chunk(chunk)
            if self.dynamic_shape or boundary not in self._header_cache:
                self._header_cache[boundary] = p2p.specs_of(tensors)
                self._sends += p2p.send_header(self._header_cache[boundary], dst, self.device)
        self._sends += p2p.send_tensors(tensors, dst)
        # keep the tensors alive until the sends complete
        self._sends.append(tensors)

    def _exec_recv_tensors(self, chunk: int, micro_batch: int, peer: int, grad: bool) -> None:
        key = (chunk, micro_batch)
        src = self._global(peer)
        if grad:
            specs = p2p.specs_of([t for t in p2p.as_tuple(self._outputs[key]) if t.requires_grad])
            self._grads[key] = p2p.recv_tensors(specs, src, self.device)
            return
        boundary = self.module.stage_of_chunk(chunk) - 1
        if self.dynamic_shape or boundary not in self._header_cache:
            self._header_cache[boundary] = p2p.recv_header(src, self.device)
        specs = self._header_cache[boundary]
        received = p2p.recv_tensors(specs, src, self.device)
        self._inputs[key] = tuple(t.requires_grad_(spec.requires_grad) for t, spec in zip(received, specs))

    def _exec_finish_sends(self) -> None:
        for work in self._sends:
            if not isinstance(work, tuple):
                work.wait()
        self._sends = []
        leftover = [name for name, buf in (("inputs", self._inputs), ("outputs", self._outputs),
                                           ("grads", self._grads), ("input grads", self._input_grads)) if buf]
        if leftover or self.store.pending():
            raise RuntimeError(f"pp-ext engine: step ended with unconsumed {', '.join(leftover) or 'W work'} "
                               f"(schedule {self.schedule.name}): the program is not complete")

    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        ins.ForwardChunk: _exec_forward_chunk,
        ins.BackwardChunk: _exec_backward_chunk,
        ins.InputGradChunk: _exec_input_grad_chunk,
        ins.WeightGradChunk: _exec_weight_grad_chunk,
        ins.SendTensors: _exec_send_tensors,
        ins.RecvTensors: _exec_recv_tensors,
        ins.FinishSends: _exec_finish_sends,
    }
