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
:class:`~pp_ext.autograd.split_backward.WeightGradStore`.

``eval_batch`` is DeepSpeed's, running a forward-only program
(:func:`forward_only`) under ``torch.no_grad()``; forward passes then keep
nothing for a backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.moe.utils import is_moe_param
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.utils import combine_grad_norm_groups
from deepspeed.utils import groups
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from pp_ext.autograd.split_backward import WeightGradStore, enable_split_backward
from pp_ext.schedules import Action, Kind, Schedule, lower

from . import instructions as ins
from . import p2p
from .boundary import require_hooks
from .module import ChunkedPipelineModule

require_hooks(PipelineEngine, deepspeed.__version__)


class PipelineError(RuntimeError):
    """An instruction failed (a peer that died or stalled past the process group's
    timeout, most often): the message names this rank, its stage, the instruction
    with its chunk, micro-batch and peer, and the step."""


def with_location(instruction: str, handler: Callable) -> Callable:
    """``handler`` whose RuntimeErrors (gloo's "Timed out waiting ... for recv", a
    closed connection, NCCL's errors) say where this rank was in the program."""

    @functools.wraps(handler)
    def run(self, **kwargs):
        try:
            return handler(self, **kwargs)
        except PipelineError:
            raise
        except RuntimeError as exc:
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PipelineError(f"{self._where(instruction, kwargs)}: {cause}") from exc

    return run


def forward_only(schedule: Schedule, micro_batches: int) -> Schedule:
    """The lowered forward-only program of ``micro_batches`` micro-batches on
    ``schedule``'s placement, every micro-batch on route 0: what ``eval_batch`` runs.

    Each rank runs its F actions in order of (micro-batch + stage, stage). F at stage
    s needs only F at stage s - 1 of the same micro-batch, which comes earlier in
    that order on every rank, so with non-blocking sends a receive never waits on a
    rank that is itself waiting (``pp_ext.schedules.dry_run`` checks this in the
    tests). ``micro_batches`` may differ from the training program's.
    """
    placement = schedule.placement
    programs = []
    for rank in range(placement.ranks):
        held = [(placement.holds(rank, chunk), chunk) for chunk in range(placement.chunks)]
        order = sorted(
            (mb + stage, stage, mb, chunk)
            for (pipeline, stage), chunk in held
            if pipeline == 0
            for mb in range(micro_batches)
        )
        programs.append(tuple(Action(Kind.F, mb, chunk) for _, _, mb, chunk in order))
    return lower(
        Schedule(f"{schedule.name} forward-only", placement, micro_batches, tuple(programs))
    )


def _grads_for_norm(optimizer, for_clipping: bool = False):
    """BF16_Optimizer's gradients for the global norm, the experts' folded in, with a zero
    where this rank counts none.

    DeepSpeed's step sums the dense gradients' squares over the model-parallel group and
    then, per expert group this rank holds, the experts' over the pipeline and expert
    groups: a stage holding no experts (a dense first layer, or only the LM head) skips
    those collectives and the stages that hold experts wait for it. Here every rank sums
    its experts' squares over each expert group of the model (all-reduced within its
    stage, a zero where it has none) and hands the root as one more dense tensor, so the
    single model-parallel sum counts dense and expert gradients once each (a tensor rank
    > 0's experts, whole on every tensor rank, are skipped as ``ds_pipe_replicated``
    copies). With tensor parallelism (Shoeybi et
    al. 2019, Sec. 3) a tensor rank > 0 of a stage holding only replicated weights (a
    final norm) and a tied copy (the LM head) skips them all, and DeepSpeed's
    ``get_global_norm_of_tensors`` cannot stack an empty list (its all-reduce over the
    model-parallel group must still run here)."""
    found = type(optimizer).get_grads_for_norm(optimizer, for_clipping)
    if for_clipping:  # a list of every gradient
        return found
    dense, experts = found
    device = optimizer.fp32_groups_flat_partition[0].device
    for name, group in sorted(groups._get_expert_parallel_group_dict().items()):
        squares = torch.zeros(1, dtype=torch.float32, device=device)
        for grad in experts.get(name, []):
            squares += grad.detach().float().pow(2).sum()
        dist.all_reduce(squares, group=group)
        dense.append(squares.sqrt())
    return dense or [torch.zeros(1, device=device)], {}


def _zero_global_norm(optimizer, norm_type: int = 2) -> torch.Tensor:
    """ZeRO-1's global gradient norm from one sum of every group's partition, over the
    data ranks and then the model-parallel group: DeepSpeed's ``get_grad_norm_direct``
    on all groups at once. DeepSpeed's ``scaled_global_norm`` runs those two all-reduces
    once per parameter group, and a stage holding experts has more groups than one
    holding none (its experts' own, partitioned over the expert-data group), so the
    stages' model-parallel all-reduces would not pair up. Summed over all data ranks, the
    expert groups' partitions hold every expert of the stage once (expert x expert-data
    ranks), as the dense partitions hold every dense parameter once."""
    if optimizer.cpu_offload:  # its norms are taken on the host as gradients move there
        return type(optimizer).scaled_global_norm(optimizer, norm_type)
    gradients: list[torch.Tensor] = []
    params: list[torch.Tensor] = []
    for i, group in enumerate(optimizer.params_in_partition):
        if grads := optimizer.averaged_gradients.get(i):
            gradients, params = gradients + grads, params + group
    # an inf/NaN norm comes back as -1: combined as DeepSpeed combines its groups', inf
    return combine_grad_norm_groups([optimizer.get_grad_norm_direct(gradients, params, norm_type)])


class ScheduleEngine(PipelineEngine):
    """Runs ``schedule`` (lowered, validated; see :func:`pp_ext.initialize`) on a
    :class:`ChunkedPipelineModule` whose placement and chunks match it."""

    total_loss: torch.Tensor | None  # DeepSpeed's, which its __init__ sets to None

    def __init__(self, *args, schedule: Schedule, **kwargs) -> None:
        self._loss_rank = None  # DeepSpeed's __init__ asks is_last_stage() in its own sense first
        super().__init__(*args, **kwargs)
        module = self.module
        if not isinstance(module, ChunkedPipelineModule):
            raise TypeError("the pp-ext engine needs a pp_ext ChunkedPipelineModule")
        if (module.placement.name, module.chunks) != (
            schedule.placement.name,
            schedule.chunks,
        ) or schedule.ranks != self.num_stages:
            raise ValueError(
                f"schedule {schedule.name} wants {schedule.ranks} ranks x {schedule.chunks} chunks in "
                f"{schedule.placement.name} placement; the module has {self.num_stages} x {module.chunks} in "
                f"{module.placement.name}: build the module with chunks={schedule.chunks}, "
                f"placement='{schedule.placement.name}'"
            )
        # an asynchronous stream spans several calls of m micro-batches each
        if (
            schedule.micro_batches % self.micro_batches
            if schedule.backward_weights
            else schedule.micro_batches != self.micro_batches
        ):
            raise ValueError(
                f"schedule has {schedule.micro_batches} micro-batches, DeepSpeed's "
                f"gradient_accumulation_steps is {self.micro_batches}: make them equal"
            )
        if self.fp16_enabled():
            raise NotImplementedError(
                "the pp-ext engine runs fp32 or bf16; fp16 (loss scaling) is not "
                'supported: use "bf16", or DeepSpeed\'s own PipelineEngine'
            )
        if (
            schedule.split_backward
            and self.using_bf16_optimizer
            and self.optimizer.immediate_grad_update
        ):
            raise ValueError(
                f"schedule {schedule.name} splits the backward: bf16 immediate_grad_update moves "
                f"gradients in autograd hooks, which the deferred weight-gradient (W) work does "
                f'not fire; set "bf16": {{"immediate_grad_update": false}} (the default)'
            )
        # the norm's collectives the same on every stage, with or without experts
        if self.using_bf16_optimizer:
            self.optimizer.get_grads_for_norm = functools.partial(_grads_for_norm, self.optimizer)
        elif self.zero_optimization():
            self.optimizer.scaled_global_norm = functools.partial(_zero_global_norm, self.optimizer)
        # DeepSpeed turns these on with a model axis (Megatron's scattered p2p); pp-ext's own
        # p2p sends whole tensors, and nothing here may take DeepSpeed's partitioned paths
        self.is_pipe_partitioned = self.is_grad_partitioned = False
        self.schedule = schedule
        self.placement = schedule.placement
        self._loss_rank = self.placement.locate(0, schedule.stages - 1)[0]
        self.store = WeightGradStore()
        if any(action.kind is Kind.I for action in schedule.programs[self.stage_id]):
            enable_split_backward(self.module, self.store)
        # (sending, stage boundary, grad mode) -> specs: with two pipelines one rank may both
        # send and receive the same boundary (p=2: rank 0 sends 0->1 down and receives 0->1 up)
        self._header_cache: dict[tuple[bool, int, bool], list[p2p.TensorSpec]] = {}
        self._trainable = [
            any(p.requires_grad for p in module.chunk_parameters(c)) for c in range(module.chunks)
        ]
        self._link = p2p.pipeline_link(
            self.grid._topo.get_axis_comm_lists("pipe"), self.global_rank, self.device
        )
        self._reset_buffers()

    # ------------------------------------------------------------------ topology

    def train_batch(self, data_iter=None):
        p2p.claim_channels(
            self
        )  # before DeepSpeed starts its timers: an error leaves the engine usable
        return super().train_batch(data_iter)

    def is_last_stage(self) -> bool:
        """True on the rank that holds the last stage (and computes the loss)."""
        if self._loss_rank is None:
            return super().is_last_stage()
        return self.stage_id == self._loss_rank

    def _loss_stage_global_rank(self) -> int:
        return self.grid.stage_to_global(stage_id=self._loss_rank)

    def _global(self, pipeline_rank: int) -> int:
        return self.grid.stage_to_global(stage_id=pipeline_rank)

    def _neighbour(self, chunk: int, offset: int) -> tuple[int, int]:
        """(pipeline rank, chunk) of the stage ``offset`` away from ``chunk``'s, on the
        pipeline ``chunk`` belongs to (callers ask past the first or last stage never)."""
        pipeline, stage = self.placement.holds(self.stage_id, chunk)
        return self.placement.locate(pipeline, stage + offset)

    # ------------------------------------------------------------------ step

    def _reset_buffers(self) -> None:
        self._inputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._outputs: dict[tuple[int, int], tuple[torch.Tensor, ...] | torch.Tensor] = {}
        self._grads: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._input_grads: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        # receives posted, not yet waited for: (grad, (chunk, micro-batch)) -> (buffers, posted, instruction)
        self._arriving: dict[tuple[bool, tuple[int, int]], tuple] = {}
        self._batches: list = []
        self._sends: list[p2p.Batch] = []

    def reset_activation_shape(self) -> None:
        super().reset_activation_shape()
        self._header_cache.clear()

    def _train_schedule(self):
        self._reset_buffers()
        return ins.ProgramSchedule(self.schedule, self.stage_id)

    def _inference_schedule(self, micro_batches: int):
        self._reset_buffers()
        return ins.ForwardProgram(forward_only(self.schedule, micro_batches), self.stage_id)

    def eval_batch(
        self,
        data_iter,
        return_logits=False,
        compute_loss=True,
        reduce_output="avg",
        bcast_loss=True,
        num_micro_batches=None,
    ):
        """DeepSpeed's ``eval_batch`` (same arguments and results) on a forward-only
        program; the module's train/eval mode is restored afterwards."""
        p2p.claim_channels(self)
        training = self.module.training
        try:
            return super().eval_batch(
                data_iter,
                return_logits=return_logits,
                compute_loss=compute_loss,
                reduce_output=reduce_output,
                bcast_loss=bcast_loss,
                num_micro_batches=num_micro_batches,
            )
        finally:
            self.module.train(training)

    def _batch(self, micro_batch: int):
        # the data iterator yields micro-batches in order; ranks holding the first
        # or the last stage read all of them, as DeepSpeed's TrainSchedule does, so
        # micro-batch k is the k-th item everywhere, whichever pipeline it takes
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
        first, last = (
            self.module.is_first_stage_chunk(chunk),
            self.module.is_last_stage_chunk(chunk),
        )
        inputs = (
            self._load_inputs(micro_batch) if first else self._received(key, grad=False).pop(key)
        )
        outputs = self.module.chunk_forward(chunk, inputs[0] if len(inputs) == 1 else inputs)
        # eval_batch runs under no_grad: keep nothing for a backward that will not come
        backward = torch.is_grad_enabled()
        if backward:
            self._inputs[key] = inputs
            needs_grad = self._trainable[chunk] or any(t.requires_grad for t in inputs)
            if needs_grad and not last and not any(t.requires_grad for t in p2p.as_tuple(outputs)):
                # gradients are wanted here or before, but none could flow back: fail now
                raise RuntimeError(
                    f"pp-ext engine: stage {self.module.stage_of_chunk(chunk)} (pipeline rank {self.stage_id}, "
                    f"chunk {chunk}) returns no tensor that needs a gradient, so it and the stages before it "
                    f"would get none: return float activations computed from its parameters or inputs "
                    f"(not detached, not under no_grad)"
                )
        if not self.module.training:
            ds_checkpointing.reset()  # as DeepSpeed's forward pass does between evaluation passes
        if last:
            labels = self._labels(
                micro_batch
            )  # read even when unused, as DeepSpeed's last stage does
            compute_loss = self._compute_loss and self.module.loss_fn is not None
            loss = self.module.loss_fn(outputs, labels) if compute_loss else outputs
            if self.eval_return_logits:
                self.outputs = outputs
            self.fwd_outputs.append(
                loss.detach() if torch.is_tensor(loss) else [t.detach() for t in loss]
            )
            if backward:
                self._outputs[key] = loss
                self.total_loss = (
                    loss.detach().clone()
                    if self.total_loss is None
                    else self.total_loss + loss.detach()
                )
            return
        rank, next_chunk = self._neighbour(chunk, +1)
        if backward or rank != self.stage_id:
            self._outputs[key] = outputs
        if rank == self.stage_id:  # the turn of a V: hand the activation over, cut the graph
            self._inputs[(next_chunk, micro_batch)] = tuple(
                t.detach().requires_grad_(t.requires_grad) for t in p2p.as_tuple(outputs)
            )

    def _clear_low_precision_grads(self) -> None:
        """bf16: start a B, I or W pass from zeroed bf16 gradients; the pass then adds
        them to BF16_Optimizer's accumulators (:meth:`_accumulate_low_precision_grads`).

        DeepSpeed's pipeline does this around each backward, so that every (parameter,
        micro-batch) gradient is rounded to bf16 once and accumulated over micro-batches
        in the optimizer's accumulation dtype (``data_types.grad_accum_dtype``). With the
        backward split, I makes every gradient except the deferred weight GEMMs' and W
        makes exactly those, so flushing after every pass, W included, still adds each
        (parameter, micro-batch) gradient once and rounded once: exact as DeepSpeed, up
        to the order in which micro-batches' gradients are added, which is the
        schedule's. Flushing only at the end of the step would accumulate in bf16; a
        parameter that gets gradient in both I and W (a Linear weight also used
        elsewhere) is rounded once per pass.

        The bf16 gradients are dropped (None), not zeroed: autograd then hands each
        parameter the gradient it computed instead of adding it to a zeroed buffer, and
        the accumulation skips what the pass did not reach (a W reaches the deferred
        weights only), where zeroed buffers would be added in full; 0 + g = g, so the
        sums are the same to the bit.
        """
        if self.using_bf16_optimizer:
            self.optimizer.clear_lp_grads(set_to_none=True)

    def _accumulate_low_precision_grads(self) -> None:
        if self.using_bf16_optimizer:
            self.optimizer.update_hp_grads(clear_lp_grads=False)

    def _backward(self, chunk: int, micro_batch: int, split: bool) -> None:
        key = (chunk, micro_batch)
        outputs = self._outputs.pop(key)
        self._clear_low_precision_grads()
        with self.store.defer(key) if split else nullcontext():
            if self.module.is_last_stage_chunk(chunk):
                # PipelineEngine.backward refuses outside train_batch; DeepSpeed's own
                # pipeline calls the DeepSpeedEngine one too: it scales by accumulation
                # steps and its epilogue accumulates bf16 gradients itself
                DeepSpeedEngine.backward(self, outputs)
            else:
                grads = self._received(key, grad=True).pop(key)
                tensors = [t for t in p2p.as_tuple(outputs) if t.requires_grad]
                self._running_engine_backward = True
                try:
                    if tensors:  # a frozen stage with frozen inputs has nothing to compute
                        torch.autograd.backward(tensors, grads)
                finally:
                    self._running_engine_backward = False
                self._accumulate_low_precision_grads()
        if not self.module.is_first_stage_chunk(chunk):
            grads = tuple(
                t.grad if t.grad is not None else torch.zeros_like(t)
                for t in self._inputs[key]
                if t.requires_grad
            )
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
        self._clear_low_precision_grads()
        self.store.run(key)
        self._accumulate_low_precision_grads()
        del self._inputs[key]  # the saved inputs of the linear layers are free now

    def _exec_send_tensors(self, chunk: int, micro_batch: int, peer: int, grad: bool) -> None:
        key = (chunk, micro_batch)
        dst = self._global(peer)
        if grad:
            tensors = self._input_grads.pop(key)
        else:
            # training keeps the outputs for the backward; eval is done with them
            tensors = p2p.as_tuple(
                self._outputs[key] if torch.is_grad_enabled() else self._outputs.pop(key)
            )
            boundary = (True, self.module.stage_of_chunk(chunk), torch.is_grad_enabled())
            if self.dynamic_shape or boundary not in self._header_cache:
                self._header_cache[boundary] = p2p.specs_of(tensors)
                self._sends.append(
                    p2p.send_header(self._link, self._header_cache[boundary], dst, self.device)
                )
        self._sends.append(
            p2p.send_tensors(self._link, tensors, dst)
        )  # each holds its tensors until done

    def _exec_recv_tensors(self, chunk: int, micro_batch: int, peer: int, grad: bool) -> None:
        """Post the receive (lowering put it where the transfer stands in the global
        sequence); the instruction that needs the tensors waits for it (:meth:`_received`)."""
        key = (chunk, micro_batch)
        src = self._global(peer)
        if grad:
            specs = p2p.specs_of([t for t in p2p.as_tuple(self._outputs[key]) if t.requires_grad])
        else:
            # keyed by grad mode too: a header cached by eval_batch says requires_grad=False,
            # and training after it would receive activations that send no gradient back
            boundary = (False, self.module.stage_of_chunk(chunk) - 1, torch.is_grad_enabled())
            if self.dynamic_shape or boundary not in self._header_cache:
                self._header_cache[boundary] = p2p.recv_header(self._link, src, self.device)
            specs = self._header_cache[boundary]
        buffers, posted = p2p.recv_tensors(self._link, specs, src, self.device)
        where = self._where(
            "RecvTensors", dict(chunk=chunk, micro_batch=micro_batch, peer=peer, grad=grad)
        )
        self._arriving[(grad, key)] = (buffers, posted, where, specs)

    def _received(self, key: tuple[int, int], grad: bool) -> dict:
        """The buffer (``_grads`` or ``_inputs``) holding ``key``, once a receive posted for
        it has completed; a tensor handed over from another chunk of this rank is there already."""
        buffer = self._grads if grad else self._inputs
        if (grad, key) in self._arriving:
            buffers, posted, where, specs = self._arriving.pop((grad, key))
            try:
                posted.wait()
            except RuntimeError as exc:
                cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise PipelineError(f"{where}, waiting for it: {cause}") from exc
            buffer[key] = (
                buffers
                if grad
                else tuple(t.requires_grad_(spec.requires_grad) for t, spec in zip(buffers, specs))
            )
        return buffer

    def _aggregate_total_loss(self):
        # two pipelines: the loss rank holds the down pipeline's losses, its pair
        # partner (holding the up pipeline's last stage) the rest; DeepSpeed then
        # averages over micro-batches and data parallelism as usual
        if self.module.replica_group is not None and self.total_loss is not None:
            dist.all_reduce(self.total_loss, group=self.module.replica_group)
        return super()._aggregate_total_loss()

    def _exec_reduce_replica_grads(self) -> None:
        """Sum the gradients of the two replicas of every stage (Chimera, Li & Hoefler
        2021, Sec. 3: the replicas' gradients are all-reduced before the synchronous
        update): g = g_down + g_up, each already scaled by 1/m as DeepSpeed's gradient
        accumulation does, so g is the gradient of the mean loss over all m micro-batches."""
        grads = []
        for param in self.module.replica_parameters():
            if self.using_bf16_optimizer:
                grads.append(param._hp_grad)
                continue
            if (
                param.grad is None
            ):  # both ranks must reduce the same sizes, as DeepSpeed's own all-reduce
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        if grads:
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.module.replica_group)
            for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(summed)

    def _configure_distributed_model(self, model):
        super()._configure_distributed_model(model)
        # expert parameters marked as DeepSpeed's MoE layer marks them (pp_ext.moe.dispatch):
        # its engine then reduces their gradients over the expert-data group only
        self.has_moe_layers = any(is_moe_param(p) for p in self.module.parameters())

    def fp32_grad_norm(self) -> torch.Tensor:
        """The norm of the whole model's fp32 gradient, each parameter once.

        DeepSpeed's ``clip_grad_norm_`` with a pipeline grid counts only the parameters of
        model-parallel rank 0 (pipeline rank 0) unless marked model-parallel, so its norm
        is the first rank's. Here ||g||^2 is summed over every pipeline rank's parameters,
        skipping copies marked ``ds_pipe_replicated`` (extra owners of tied weights,
        Chimera's up replicas) as DeepSpeed's bf16 and ZeRO paths do."""
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        experts = torch.zeros((), dtype=torch.float32, device=self.device)
        for param in self.module.parameters():
            if param.grad is not None and not getattr(param, "ds_pipe_replicated", False):
                part = param.grad.detach().float().pow(2).sum()
                if is_moe_param(param):
                    experts += part
                else:
                    squares += part
        for name in sorted(self.expert_parallel_group):  # the other ranks' experts
            dist.all_reduce(experts, group=self.expert_parallel_group[name])
        squares += experts
        dist.all_reduce(squares, group=self.mpu.get_model_parallel_group())
        return squares.sqrt()

    def clip_fp32_gradients(self) -> None:
        """fp32 clipping by :meth:`fp32_grad_norm` (taken once per step, by
        :meth:`_take_model_step`), with torch's factor min(1, max_norm / (norm + 1e-6))."""
        factor = torch.clamp(self.gradient_clipping() / (self._step_grad_norm + 1e-6), max=1.0)
        for param in self.module.parameters():
            if param.grad is not None:
                param.grad.mul_(factor)

    def _take_model_step(self, lr_kwargs):
        """fp32 without ZeRO: a step whose gradient norm is not finite is skipped, as
        DeepSpeed's bf16 and ZeRO optimizers skip one (BF16_Optimizer.step and ZeRO's
        step on an invalid norm): weights, optimizer state and learning-rate schedule
        stay as they were, the gradients are cleared, ``skipped_steps`` counts it."""
        if self.bfloat16_enabled() or self.zero_optimization():
            return super()._take_model_step(lr_kwargs)
        self._step_grad_norm = self.fp32_grad_norm()
        if bool(torch.isfinite(self._step_grad_norm)):
            return super()._take_model_step(lr_kwargs)
        # the bookkeeping of DeepSpeed's overflow branch, without the optimizer step
        self.zero_grad()
        self._step_applied = False
        self.skipped_steps += 1
        self.losses = None
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        return None

    def _exec_finish_sends(self) -> None:
        for posted in self._sends:
            posted.wait()
        self._sends = []
        leftover = [
            name
            for name, buf in (
                ("inputs", self._inputs),
                ("outputs", self._outputs),
                ("grads", self._grads),
                ("input grads", self._input_grads),
                ("receives", self._arriving),
            )
            if buf
        ]
        if leftover or self.store.pending():
            raise RuntimeError(
                f"pp-ext engine: step ended with unconsumed {', '.join(leftover) or 'W work'} "
                f"(schedule {self.schedule.name}): the program is not complete"
            )

    def _where(self, instruction: str, kwargs: dict) -> str:
        """This rank, its stage and the instruction it was executing, for an error line."""
        args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        peer = f", peer rank {self._global(kwargs['peer'])}" if "peer" in kwargs else ""
        return (
            f"rank {self.global_rank} (pipeline rank {self.stage_id}) failed in {instruction}({args}) "
            f"of step {self.global_steps + 1}{peer}"
        )

    _INSTRUCTION_MAP = {
        kind: with_location(kind.__name__, handler)
        for kind, handler in {
            **PipelineEngine._INSTRUCTION_MAP,
            ins.ForwardChunk: _exec_forward_chunk,
            ins.BackwardChunk: _exec_backward_chunk,
            ins.InputGradChunk: _exec_input_grad_chunk,
            ins.WeightGradChunk: _exec_weight_grad_chunk,
            ins.SendTensors: _exec_send_tensors,
            ins.RecvTensors: _exec_recv_tensors,
            ins.FinishSends: _exec_finish_sends,
            ins.ReduceReplicaGrads: _exec_reduce_replica_grads,
        }.items()
    }
