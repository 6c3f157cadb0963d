"""ChunkedPipelineModule: DeepSpeed's PipelineModule with several chunks per rank.

The layer list is cut into ``S = p * chunks`` stages; chunk ``c`` of pipeline rank
``r`` holds the stage that :class:`~pp_ext.schedules.placement.Placement` gives it
("loop": Megatron interleaving, "v": ZB-V / DualPipeV, "bidirectional": Chimera's
two pipelines over two replicas of every stage). Every rank builds only its own
chunks' layers. Each chunk keeps its own ``forward_funcs``; running a chunk
switches them in and reuses ``PipelineModule.forward`` unchanged, as DeepSpeed's
``DualPipeVModule`` does with its two phases.

The partitioning arithmetic is pure (:mod:`pp_ext.planning.partition`), so that layouts for
any p can be checked without a process group; :func:`partition` applies a method to layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from io import StringIO

import torch
from deepspeed import comm as dist
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from deepspeed.runtime.utils import partition_balanced, partition_uniform
from deepspeed.utils import logger
from torch import nn
from torch.distributed import ProcessGroup

from pp_ext import tp
from pp_ext.planning.partition import (
    METHODS,
    balanced_parts,
    check_boundaries,
    chunk_layout,
    layer_rank,
    layer_stage,
)
from pp_ext.schedules.cost_model import Profile
from pp_ext.schedules.placement import PLACEMENTS, Placement


def layer_name(layer) -> str | None:
    """The class or function name DeepSpeed's 'type:' partitioning matches against."""
    if isinstance(layer, LayerSpec):
        return layer.typename.__name__
    if isinstance(layer, nn.Module):
        return type(layer).__name__
    return getattr(layer, "__name__", None)


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _frozen_trainable(module: nn.Module) -> tuple[int, int]:
    trainable = _trainable(module)
    return sum(p.numel() for p in module.parameters()) - trainable, trainable


def layer_parameters(
    layers: Sequence, adapt: Callable[[int, nn.Module], object] | None = None
) -> list[tuple[int, int]]:
    """(frozen, trainable) parameters of each layer, without allocating any of them;
    ``adapt(index, module)`` runs on each built layer first (e.g. LoRA's adapters, which
    freeze the rest).

    DeepSpeed's 'parameters' method builds every LayerSpec at full size on every rank
    just to count; here each is built on the meta device. A layer whose constructor
    needs real data (e.g. calls ``.item()``) cannot be built there and is built for
    real, one at a time, as DeepSpeed would. A TiedLayerSpec counts at every place it
    is used, as in DeepSpeed: the count stands for the work of that place (a tied LM
    head costs as much as its weight suggests), but it is built only once.
    """

    def build(index: int, spec: LayerSpec) -> nn.Module:
        module = spec.build()
        if adapt is not None:
            adapt(index, module)
        return module

    counts: list[tuple[int, int]] = []
    tied: dict[str, tuple[int, int]] = {}
    for index, layer in enumerate(layers):
        if isinstance(layer, TiedLayerSpec) and layer.key in tied:
            counts.append(tied[layer.key])
            continue
        if isinstance(layer, LayerSpec):
            try:
                with torch.device("meta"):
                    count = _frozen_trainable(build(index, layer))
            except Exception:  # noqa: BLE001 - any meta-only failure; a real one re-raises below
                count = _frozen_trainable(build(index, layer))
            if isinstance(layer, TiedLayerSpec):
                tied[layer.key] = count
        elif isinstance(layer, nn.Module):
            count = _frozen_trainable(layer)
        else:
            count = (0, 0)
        counts.append(count)
    return counts


def layer_param_counts(layers: Sequence) -> list[int]:
    """Trainable parameters of each layer (:func:`layer_parameters`), what DeepSpeed's
    'parameters' partitioning weighs."""
    return [trainable for _, trainable in layer_parameters(layers)]


def _type_weights(layers: Sequence, pattern: str) -> list[int]:
    regex = re.compile(pattern, re.IGNORECASE)
    weights = [int(bool((name := layer_name(layer)) and regex.search(name))) for layer in layers]
    if not any(weights):
        raise ValueError(
            f"partition_method 'type:{pattern}' matches no layer: "
            f"layer types are {sorted({n for n in map(layer_name, layers) if n})}"
        )
    return weights


def partition(
    layers: Sequence, stages: int, method: str | Sequence[int] = "parameters"
) -> list[int]:
    """Stage boundaries ``parts`` (``stages + 1`` ints): stage s holds layers
    ``parts[s]:parts[s+1]``. Methods as DeepSpeed's, plus explicit boundaries and
    'balanced:FILE' (measured per-layer costs of a ``pp-ext tune`` profile,
    :func:`balanced_parts`); 'parameters' counts on the meta device
    (:func:`layer_param_counts`)."""
    if len(layers) < stages:
        raise ValueError(
            f"{len(layers)} layers cannot fill {stages} pipeline stages (one layer at least each): "
            f"use fewer chunks or fewer pipeline stages"
        )
    if not isinstance(method, str):
        return check_boundaries(method, len(layers), stages)
    kind, _, pattern = method.partition(":")
    if kind.lower() == "uniform" and not pattern:
        parts = partition_uniform(num_items=len(layers), num_parts=stages)
    elif kind.lower() == "parameters" and not pattern:
        parts = partition_balanced(weights=layer_param_counts(layers), num_parts=stages)
    elif kind.lower() == "type" and pattern:
        parts = partition_balanced(weights=_type_weights(layers, pattern), num_parts=stages)
    elif kind.lower() == "balanced":
        if not pattern:
            raise ValueError(
                "partition_method 'balanced' needs measured layer costs: give 'balanced:PROFILE.json' "
                "(written by pp-ext tune)"
            )
        parts = balanced_parts(Profile.load(pattern).layer_costs(len(layers)), stages)
    else:
        raise ValueError(f"partition_method must be {METHODS}, got {method!r}")
    return [int(b) for b in parts]


class ChunkedPipelineModule(PipelineModule):
    """A :class:`deepspeed.pipe.PipelineModule` cut into ``p * chunks`` stages.

    Takes PipelineModule's arguments plus ``chunks`` and ``placement`` ("loop" or "v").
    ``num_stages`` (or the topology's pipe axis) stays the number of pipeline *ranks*,
    as DeepSpeed's engine and grid expect; ``placement.stages`` is the number of model
    stages. ``partition_method`` may also be a list of ``S + 1`` layer boundaries.

    Layers tied (TiedLayerSpec) within one rank share one module and get no gradient
    all-reduce; ties across ranks get DeepSpeed's ``tied_comms`` over those ranks.

    In "bidirectional" placement (Chimera, Li & Hoefler 2021) pipeline ranks r and
    p-1-r hold the same two stages (r's chunk 0 is the down replica of stage r, the
    partner's chunk 1 its up replica). The up replicas start from the down ones'
    weights (broadcast once, as DeepSpeed does for tied weights) and the pair's
    gradients are summed before the optimizer step (:meth:`replica_parameters`,
    :attr:`replica_group`), so both replicas stay identical. A tie must keep to one
    such pair (stages s and p-1-s, e.g. embedding and LM head): DeepSpeed's
    ``tied_comms`` then sum its weight over exactly the pair.

    With a model axis in the topology (tensor parallelism, Shoeybi et al. 2019, Sec. 3)
    layers are counted and built on :attr:`tensor_axis`, the grid's slice-parallel
    group (:mod:`pp_ext.tp`), and the parameters every tensor rank holds whole are
    counted once in gradient norms (:func:`pp_ext.tp.mark_replicated`); the vocabulary is
    padded to a multiple of ``make_vocab_size_divisible_by`` x tensor (:mod:`pp_ext.tp.vocab`).
    """

    def __init__(
        self,
        layers,
        *args,
        chunks: int = 1,
        placement: str = "loop",
        make_vocab_size_divisible_by: int = 1,
        **kwargs,
    ):
        if not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be a positive int, got {chunks!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        if placement == "bidirectional" and chunks != 2:
            raise ValueError(
                f"bidirectional placement holds 2 chunks per rank (a down and an up replica), "
                f"got chunks={chunks}: use chunks=2"
            )
        # read by _partition_layers, which PipelineModule.__init__ calls
        self._chunks, self._placement_name = chunks, placement
        self._vocab_multiple = make_vocab_size_divisible_by
        # PipelineModule and its grid print() their seeds and topology on rank 0, with no
        # logging switch: kept out of the training log, in DeepSpeed's debug log
        with redirect_stdout(StringIO()) as printed:
            super().__init__(layers, *args, **kwargs)
        if printed.getvalue().strip():
            logger.debug(printed.getvalue().strip())
        # after PipelineModule's build, which resets every ds_pipe_replicated flag
        tp.mark_replicated(self, self.tensor_axis)
        self.replica_group: ProcessGroup | None
        self._pair: list[int] | None
        self.replica_group, self._pair = self._replica_pair()
        self._replicas = self._share_replicas()

    def parameters_changed(self) -> None:
        """Index the parameters again after layers gained or froze some (LoRA adapters,
        :mod:`pp_ext.peft`): tensor-replicated marks, and the replicas of a bidirectional
        placement broadcast from their down copy. Collective: every rank calls it."""
        tp.mark_replicated(self, self.tensor_axis)
        self._replicas = self._share_replicas()

    @property
    def placement(self) -> Placement:
        return self._placement

    @property
    def chunks(self) -> int:
        return self._chunks

    def stage_of_chunk(self, chunk: int) -> int:
        return self._placement.holds(self.stage_id, chunk)[1]

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        """``(start, stop)`` global layer indices of ``chunk``."""
        return self._chunk_bounds[chunk]

    def is_first_stage_chunk(self, chunk: int) -> bool:
        return self.stage_of_chunk(chunk) == 0

    def is_last_stage_chunk(self, chunk: int) -> bool:
        return self.stage_of_chunk(chunk) == self._placement.stages - 1

    def stage_owner(self, layer_idx: int) -> int:
        """Pipeline rank holding ``layer_idx``: DeepSpeed's tied-module indexing uses it
        as the pipe coordinate of the layer."""
        return layer_rank(self._placement, self.parts, layer_idx)

    def chunk_modules(self, chunk: int) -> list[nn.Module]:
        """The modules ``chunk`` runs, in order; a tied module used twice is listed twice."""
        return [module for _, module in self.indexed_chunk_modules(chunk)]

    def indexed_chunk_modules(self, chunk: int) -> list[tuple[int, nn.Module]]:
        """``(global layer index, module)`` of each module ``chunk`` runs, in order."""
        start, stop = self._chunk_bounds[chunk]
        modules = []
        for idx in range(start, stop):
            spec = self._layer_specs[idx]
            if isinstance(spec, TiedLayerSpec):
                modules.append((idx, self.tied_modules[spec.key]))
            elif isinstance(spec, (LayerSpec, nn.Module)):
                modules.append((idx, self._modules[str(idx)]))
        return modules

    def chunk_parameters(self, chunk: int) -> list[nn.Parameter]:
        """Parameters of ``chunk``, each once. A module tied between two chunks of this
        rank appears in both chunks' lists."""
        params = {id(p): p for module in self.chunk_modules(chunk) for p in module.parameters()}
        return list(params.values())

    @contextmanager
    def chunk(self, chunk: int) -> Iterator[None]:
        """Expose ``chunk`` as this module's forward pass (and ``_local_start/stop``,
        which DeepSpeed's checkpoint paths and seeds read) for the duration."""
        previous = self._active_chunk
        self._activate(chunk)
        try:
            yield
        finally:
            self._activate(previous)

    def chunk_forward(self, chunk: int, inputs):
        """Run ``chunk``'s layers on ``inputs``, exactly as PipelineModule.forward runs a stage."""
        with self.chunk(chunk):
            return self(inputs)

    def forward(self, forward_input):
        """PipelineModule.forward on the active chunk.

        The parent's checkpointed segments look up ``self.forward_funcs`` when they are
        recomputed in backward, by which time another chunk may be active: the checkpoint
        function is wrapped for this call so that recomputation runs under this chunk.

        Reentrant checkpointing of a segment whose inputs need no gradient (token ids
        into the embedding) would return outputs that need none either, so its
        parameters, and every layer after it, would get no gradient: such a segment
        runs without checkpointing (where DeepSpeed's own pipeline fails).

        A layer may hand the next layer of its chunk objects that are not tensors (the
        masks and rotary tables an HF chunk builds once, :mod:`pp_ext.hf.context`); only
        tensors cross a stage, so the chunk's output keeps its tensors alone.
        """
        checkpoint, chunk = self.activation_checkpoint_func, self._active_chunk
        reentrant = checkpoint is not ds_checkpointing.non_reentrant_checkpoint

        def run_under_chunk(function):
            def run(*args):
                with self.chunk(chunk):
                    return function(*args)

            return run

        def checkpoint_under_chunk(function, *args):
            if reentrant and not any(torch.is_tensor(a) and a.requires_grad for a in args):
                return function(*args)
            return checkpoint(run_under_chunk(function), *args)

        self.activation_checkpoint_func = checkpoint_under_chunk
        try:
            outputs = super().forward(forward_input)
        finally:
            self.activation_checkpoint_func = checkpoint
        if isinstance(outputs, tuple) and not all(torch.is_tensor(t) for t in outputs):
            outputs = tuple(t for t in outputs if torch.is_tensor(t))
        return outputs

    # --- PipelineModule hooks -------------------------------------------------------

    def _partition_layers(self, method="parameters"):
        if self._placement_name == "bidirectional" and self.num_stages % 2:
            raise ValueError(
                f"bidirectional placement pairs pipeline rank r with rank p-1-r, so it needs an "
                f"even number of pipeline stages, got {self.num_stages}: use an even num_stages"
            )
        self._placement = Placement.named(self._placement_name, self.num_stages, self._chunks)
        # the first hook PipelineModule calls once its grid exists
        self.tensor_axis = tp.from_grid(self._grid, self._vocab_multiple)
        with tp.using(self.tensor_axis):
            self.parts = partition(self._layer_specs, self._placement.stages, method)
        if self._placement.pipelines > 1:
            self._check_ties_keep_to_a_pair()
        self._chunk_bounds = chunk_layout(self._placement, self.parts, self.stage_id)
        if self.global_rank == 0:
            for stage in range(self._placement.stages):
                rank, chunk = self._placement.locate(0, stage)
                start, stop = self.parts[stage], self.parts[stage + 1]
                names = ", ".join(
                    layer_name(layer) or repr(layer) for layer in self._layer_specs[start:stop]
                )
                logger.info(
                    f"stage {stage} (rank {rank} chunk {chunk}) layers [{start}, {stop}): {names}"
                )
        self._set_bounds(*self._chunk_bounds[0])

    def _build(self):
        # The parent builds the layers between _local_start and _local_stop into
        # forward_funcs; tied_modules persists across calls, so a key tied between two
        # chunks of this rank is built once and shared.
        self._chunk_funcs = []
        for start, stop in self._chunk_bounds:
            self._set_bounds(start, stop)
            self.forward_funcs = []
            with tp.using(self.tensor_axis):
                super()._build()
            self._chunk_funcs.append(self.forward_funcs)
        self._chunk_checkpointable = [[] for _ in range(self._chunks)]
        self._activate(0)
        # PipelineModule leaves this to the engine, and until then its forward with an
        # interval > 0 runs no layer at all (it zips the layers with an empty list).
        if self.activation_checkpoint_interval > 0:
            self._precompute_checkpointable_values()

    def _activate(self, chunk: int) -> None:
        self._active_chunk = chunk
        self.forward_funcs = self._chunk_funcs[chunk]
        self.is_checkpointable_results = self._chunk_checkpointable[chunk]
        self._local_start, self._local_stop = self._chunk_bounds[chunk]

    def _precompute_checkpointable_values(self):
        for chunk in range(self._chunks):
            with self.chunk(chunk):
                # the parent caches by interval only, which would carry over between chunks
                self.is_checkpointable_results_interval = None
                super()._precompute_checkpointable_values()
                self._chunk_checkpointable[chunk] = self.is_checkpointable_results

    def _check_ties_keep_to_a_pair(self) -> None:
        p = self._placement.stages
        for key in sorted({s.key for s in self._layer_specs if isinstance(s, TiedLayerSpec)}):
            stages = sorted(
                {
                    layer_stage(self.parts, idx)
                    for idx, s in enumerate(self._layer_specs)
                    if isinstance(s, TiedLayerSpec) and s.key == key
                }
            )
            if len({min(s, p - 1 - s) for s in stages}) > 1:
                raise ValueError(
                    f"bidirectional placement: tied layers {key!r} sit on stages {stages}, held by "
                    f"more than one pair of ranks (s, p-1-s): tie only layers of stages s and "
                    f"p-1-s (e.g. embedding on the first stage and LM head on the last)"
                )

    def _replica_pair(self) -> tuple[ProcessGroup | None, list[int] | None]:
        """Bidirectional placement: the pair group {r, p-1-r} of this rank and its two
        global ranks (None, None otherwise). One group per pair of every data- and
        model-parallel fiber is created, collectively, in the same order on every rank,
        as DeepSpeed's tie groups."""
        if self._placement.pipelines == 1:
            return None, None
        p, grid = self.num_stages, self._grid
        slices = grid.get_slice_parallel_world_size()
        mine: tuple[ProcessGroup | None, list[int] | None] = None, None  # p is even (Chimera)
        for dp in range(grid.data_parallel_size):
            for mp in range(slices):
                for r in range(p // 2):
                    where = {"data": dp, **({"model": mp} if slices > 1 else {})}
                    ranks = [grid.stage_to_global(stage_id=s, **where) for s in (r, p - 1 - r)]
                    group = dist.new_group(ranks=ranks)
                    if self.global_rank in ranks:
                        mine = (group, ranks)
        return mine

    def _share_replicas(self) -> list[nn.Parameter]:
        """Bidirectional placement: this rank's replicated parameters, each broadcast from
        its down replica (the pair rank whose chunk 0 holds it; the lower rank where both
        chunks do), the other copy marked ``ds_pipe_replicated`` so the global gradient
        norm counts every stage once. Parameters DeepSpeed's tie groups already sum are
        left to them."""
        if self.replica_group is None or self._pair is None:  # None together: one pipeline
            return []
        ranks, partner = self._pair, self.num_stages - 1 - self.stage_id
        tied = {
            id(self._recursive_getattr(comm["module"], attr))
            for comm in self.tied_comms.values()
            for attr in comm["weight_attr"]
        }
        source: dict[int, int] = {}  # id -> pipeline rank of the down replica
        for chunk, owner in ((0, self.stage_id), (1, partner)):
            for param in self.chunk_parameters(chunk):
                source[id(param)] = min(owner, source.get(id(param), owner))
        replicas = [
            param
            for _, param in sorted(self.named_parameters())
            if id(param) in source and id(param) not in tied
        ]
        with torch.no_grad():
            for param in replicas:
                src = ranks[0] if source[id(param)] == min(self.stage_id, partner) else ranks[1]
                dist.broadcast(param, src=src, group=self.replica_group)
                if source[id(param)] != self.stage_id:
                    param.ds_pipe_replicated = True
        return replicas

    def replica_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradients the engine sums over :attr:`replica_group` (bidirectional
        placement; empty otherwise), in the same order on both ranks of a pair (by name);
        frozen ones have no gradient."""
        return [param for param in self._replicas if param.requires_grad]

    def get_tied_weights_and_groups(self):
        # DeepSpeed's engine all-reduces these weights' gradients: a frozen one has none
        return [(w, group) for w, group in super().get_tied_weights_and_groups() if w.requires_grad]

    def _synchronize_tied_weights(self):
        # DeepSpeed broadcasts the tied parameters (at build and after loading) in grad
        # mode: the in-place c10d::broadcast_ then sits in the autograd graph, and the first
        # backward warns that torch's autograd fallback for it "may lead to silently
        # incorrect behavior" and will be removed. Copying weights is no part of the model.
        with torch.no_grad():
            super()._synchronize_tied_weights()

    def _index_tied_modules(self):
        # The parent creates a group for every tie (collectively, on every rank); a tie
        # whose uses all live on one rank is one shared module, so nothing to exchange.
        comms = super()._index_tied_modules()
        return {key: comm for key, comm in comms.items() if len(comm["ranks"]) > 1}

    def save_state_dict(self, *args, **kwargs):
        # one replica per stage: with two pipelines, chunk 0 of every rank covers every stage once
        for chunk in range(self._chunks // self._placement.pipelines):
            with self.chunk(chunk):
                super().save_state_dict(*args, **kwargs)

    def load_state_dir(self, *args, **kwargs):
        for chunk in range(self._chunks):
            with self.chunk(chunk):
                super().load_state_dir(*args, **kwargs)

    def compile(self, *args, **kwargs):
        for chunk in range(self._chunks):
            with self.chunk(chunk):
                super().compile(*args, **kwargs)
