"""pp-ext programs as DeepSpeed pipeline schedules.

A lowered program of one rank (:mod:`pp_ext.schedules`) becomes a DeepSpeed
:class:`~deepspeed.runtime.pipe.schedule.PipeSchedule` whose ``steps()`` yield one
instruction per action, then DeepSpeed's own end of step (``ReduceTiedGrads``,
``ReduceGrads``, ``OptimizerStep``), with ``ReduceReplicaGrads`` before ``ReduceGrads``
where two pipelines hold two replicas of every stage. DeepSpeed's buffer instructions address one
``buffer_id`` on a rank holding one stage; pp-ext's address a (chunk,
micro-batch) and a peer rank, and split the backward into I and W, so they are new
:class:`PipeInstruction` subclasses dispatched through the engine's
``_INSTRUCTION_MAP`` (see :mod:`pp_ext.engine.engine`).
"""

from __future__ import annotations

from deepspeed.runtime.pipe import schedule as ds

from pp_ext.schedules import Action, Kind, Schedule


class ChunkInstruction(ds.PipeInstruction):
    """An instruction on one (chunk, micro-batch) of the rank that runs it."""

    def __init__(self, chunk: int, micro_batch: int, **kwargs) -> None:
        super().__init__(chunk=chunk, micro_batch=micro_batch, **kwargs)


class ForwardChunk(ChunkInstruction):
    """F: run the chunk's layers (and the loss where the chunk is the last stage)."""


class BackwardChunk(ChunkInstruction):
    """B: full backward of the chunk (input and weight gradients at once)."""


class InputGradChunk(ChunkInstruction):
    """I: input-gradient half of the backward; weight GEMMs are deferred to W."""


class WeightGradChunk(ChunkInstruction):
    """W: the deferred weight-gradient work of an earlier I."""


class Update(ChunkInstruction):
    """U: an optimizer update of the chunk's weights inside the program (asynchronous
    schedules, :mod:`pp_ext.engine.async_engine`): a new weight version."""


class SendTensors(ChunkInstruction):
    """Send the chunk's outputs (``grad=False``) or input gradients to ``peer``."""

    def __init__(self, chunk: int, micro_batch: int, peer: int, grad: bool) -> None:
        super().__init__(chunk, micro_batch, peer=peer, grad=grad)


class RecvTensors(ChunkInstruction):
    """Receive the chunk's inputs (``grad=False``) or output gradients from ``peer``."""

    def __init__(self, chunk: int, micro_batch: int, peer: int, grad: bool) -> None:
        super().__init__(chunk, micro_batch, peer=peer, grad=grad)


class FinishSends(ds.PipeInstruction):
    """Wait for every send of the step to complete before gradients are reduced."""


class ReduceReplicaGrads(ds.PipeInstruction):
    """Sum the gradients of the two replicas of each stage (two pipelines, Chimera)
    between the pair of ranks holding them, before DeepSpeed's data-parallel ``ReduceGrads``."""


_COMPUTE = {
    Kind.F: ForwardChunk,
    Kind.B: BackwardChunk,
    Kind.I: InputGradChunk,
    Kind.W: WeightGradChunk,
    Kind.U: Update,
}
_COMM = {
    Kind.SEND_ACT: (SendTensors, False),
    Kind.SEND_GRAD: (SendTensors, True),
    Kind.RECV_ACT: (RecvTensors, False),
    Kind.RECV_GRAD: (RecvTensors, True),
}


def to_instruction(action: Action) -> ds.PipeInstruction:
    if action.kind in _COMPUTE:
        return _COMPUTE[action.kind](action.chunk, action.micro_batch)
    if action.kind in _COMM:
        cls, grad = _COMM[action.kind]
        assert action.peer is not None  # a communication action has one (Action.__post_init__)
        return cls(action.chunk, action.micro_batch, peer=action.peer, grad=grad)
    raise ValueError(f"{action} has no DeepSpeed instruction")


class ProgramSchedule(ds.PipeSchedule):
    """One rank's lowered program as a DeepSpeed training schedule."""

    def __init__(
        self, schedule: Schedule, rank: int, actions: tuple[Action, ...] | None = None
    ) -> None:
        """``actions``: a part of the rank's program (one call of an asynchronous stream)."""
        if not schedule.lowered and schedule.ranks > 1:
            raise ValueError("ProgramSchedule needs a lowered schedule (pp_ext.schedules.lower)")
        super().__init__(micro_batches=schedule.micro_batches, stages=schedule.ranks, stage_id=rank)
        self.instructions = [
            to_instruction(a) for a in (schedule.programs[rank] if actions is None else actions)
        ]
        self.replicated = schedule.placement.pipelines > 1

    def steps(self):
        for instruction in self.instructions:
            yield [instruction]
        yield self.end()

    def end(self) -> list[ds.PipeInstruction]:
        replicas = [ReduceReplicaGrads()] if self.replicated else []
        return [
            FinishSends(),
            ds.ReduceTiedGrads(),
            *replicas,
            ds.ReduceGrads(),
            ds.OptimizerStep(),
        ]

    def num_pipe_buffers(self) -> int:
        # the pp-ext engine keys its buffers by (chunk, micro-batch), not by buffer id
        return 1


class AsyncCall(ProgramSchedule):
    """One call of an asynchronous stream: updates happen inside it (``Update``), so
    its end only settles the sends (:mod:`pp_ext.engine.async_engine`)."""

    def end(self) -> list[ds.PipeInstruction]:
        return [FinishSends()]


class ForwardProgram(ProgramSchedule):
    """One rank's forward-only program (``eval_batch``): no gradients to reduce, no step."""

    def end(self) -> list[ds.PipeInstruction]:
        return [FinishSends()]
