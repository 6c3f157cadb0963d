"""The cost model of measured layers: per-layer F, I, W, B seconds, activation and
parameter bytes, p2p and all-reduce times (a :class:`Profile`), priced per stage for
any cut of the model into stages (:meth:`Profile.stage_costs`, the simulator's
:class:`~pp_ext.schedules.costs.Costs`), and the profile file that carries them.

Pure Python, as :mod:`pp_ext.schedules`: what measures a profile is
:mod:`pp_ext.bench.measure` (the timing) and :mod:`pp_ext.bench.profiler` (a recipe's
model); ``parallel.partition: balanced:FILE``, ``auto`` and ``pp-ext tune`` read it.

Qi et al. 2024 ("Zero Bubble Pipeline Parallelism", ICLR, Sec. 3) compute their
schedules from profiled F, B (pp-ext's I), W and communication times, because the
best order depends on them. A profile holds them per layer, not per stage, so that
any cut of the model into stages (:meth:`Profile.stage_costs`) and the cut itself
(:func:`pp_ext.planning.partition.balanced_parts`) come from one measurement. The
embedding and the head are layers like the others, the loss counted with the last
one, so a heavy head (large vocabulary) shows up where it is. The all-reduce between
two ranks is kept as latency + bytes / bandwidth (the alpha-beta model of Hockney
1994), so that the sum of Chimera's two weight replicas (Li & Hoefler 2021, Sec. 3.3)
is priced for any cut: a rank of the bidirectional placement sums stages i and p-1-i
(:meth:`Profile.stage_costs`, ``Costs.replica_reduce``).

An MoE layer under expert parallelism (``parallel.expert: E`` > 1,
:mod:`pp_ext.moe.dispatch`) posts all-to-alls on its expert group that its rank waits
for: in F the per-expert counts, the token-expert rows out to their experts and the
results back; in I (and the fused B) the reverse of the two row exchanges (autograd's
gradient of each); W holds only the experts' weight GEMMs and posts none. Each is
priced as communication, alpha-beta again (:func:`alltoall_seconds`): latency + the
bytes a rank sends to the other ``E - 1`` ranks / bandwidth, where a layer's
``routed_bytes`` (tokens x top_k x hidden x dtype bytes of one micro-batch, what it
hands its experts) leave the rank in the share ``(E - 1) / E`` under uniform routing:
the balanced load that the load-balancing loss aims at (Fedus et al. 2022, Switch
Transformer, Sec. 2.2) sends equal shares to each of the ``E`` ranks, one of them the
rank itself; the per-rank volume of the expert-parallel all-to-all of DeepSpeed-MoE
(Rajbhandari et al. 2022, Sec. 5) and Megatron-Core's all-to-all dispatcher under a
balanced load. The counts exchange moves ``E x local`` numbers: its latency only. Under the same assumption a rank's experts receive as many
rows as it routes, so the GEMMs measured at E = 1 stand for E > 1. The expert count is
the recipe's, given when pricing (:meth:`Profile.stage_costs`): one profile prices any
E. The balanced cut (:meth:`Profile.layer_costs`) balances the measured compute.

File format (JSON)::

    {"comm": s, "micro_batch_size": b, "seq": t, "dtype": "float32",
     "allreduce_latency": s, "allreduce_bandwidth": bytes/s,
     "alltoall_latency": s, "alltoall_bandwidth": bytes/s,
     "layers": [{"name": "Embedding", "forward": s, "input_grad": s, "weight_grad": s,
                 "backward": s, "activation_bytes": n, "parameter_bytes": n,
                 "routed_bytes": n}, ...]}

(a file without the all-reduce fields or ``parameter_bytes``, written before they
existed, prices the replica sum at 0; one without the all-to-all fields or
``routed_bytes`` prices the all-to-alls at 0; a null bandwidth is one too high to
measure).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pp_ext.schedules.costs import Costs
from pp_ext.tools.files import write_atomic


@dataclass(frozen=True)
class LayerCost:
    name: str
    forward: float
    input_grad: float
    weight_grad: float
    backward: float
    activation_bytes: int
    parameter_bytes: int = 0
    # bytes of the token-expert rows one micro-batch hands the layer's routed experts
    # (tokens x top_k x hidden x dtype bytes); 0 in a dense layer
    routed_bytes: int = 0


# all-to-alls an MoE layer waits for under expert parallelism (pp_ext.moe.dispatch): in F
# the counts (latency only) and the rows out and back; in I and B the two rows' reverse
FORWARD_EXCHANGES, BACKWARD_EXCHANGES = 2, 2


def alltoall_seconds(size: float, expert: int, latency: float, bandwidth: float) -> float:
    """Seconds of one all-to-all over ``expert`` ranks in which each rank hands ``size``
    bytes to the group, spread evenly (uniform routing): latency + the ``(E - 1) / E``
    of them that leave the rank / bandwidth (Hockney 1994); 0 with one rank."""
    if expert == 1:
        return 0.0
    return latency + size * (expert - 1) / expert / bandwidth


@dataclass(frozen=True)
class Profile:
    layers: tuple[LayerCost, ...]
    comm: float
    micro_batch_size: int
    seq: int
    dtype: str = "float32"
    allreduce_latency: float = 0.0
    allreduce_bandwidth: float = float("inf")
    alltoall_latency: float = 0.0
    alltoall_bandwidth: float = float("inf")

    def dispatch_seconds(self, layer: LayerCost, expert: int) -> tuple[float, float]:
        """Seconds the all-to-alls of ``layer`` add to its F and to its I (and B) with its
        experts spread over ``expert`` ranks; (0, 0) in a dense layer or with one rank."""
        if not layer.routed_bytes or expert == 1:
            return 0.0, 0.0
        rows = alltoall_seconds(
            layer.routed_bytes, expert, self.alltoall_latency, self.alltoall_bandwidth
        )
        counts = self.alltoall_latency
        return counts + FORWARD_EXCHANGES * rows, BACKWARD_EXCHANGES * rows

    def layer_costs(self, count: int) -> list[float]:
        """Seconds of one training micro-batch (forward + fused backward) per layer."""
        if count != len(self.layers):
            raise ValueError(
                f"the profile measures {len(self.layers)} layers, the model has {count}: "
                f"profile this model again (pp-ext tune --recipe ...)"
            )
        return [layer.forward + layer.backward for layer in self.layers]

    def stage_costs(self, parts: list[int], expert: int = 1) -> Costs:
        """Per-stage F, I, W, B (sums over each stage's layers; with ``expert`` > 1 the
        MoE layers' all-to-alls in F, I and B, :meth:`dispatch_seconds`) for the
        simulator, and the replica sum of a two-pipeline (bidirectional) schedule on this cut: rank i
        all-reduces the gradients of stages i and p-1-i in one flat buffer with its
        partner, all pairs at once, so the slowest pair's time (paid only where a
        schedule has two pipelines, :func:`pp_ext.schedules.simulate`)."""
        self.layer_costs(parts[-1])
        if expert < 1:
            raise ValueError(f"expert parallelism takes >= 1 rank, got {expert}")

        def priced(layer: LayerCost) -> tuple[float, float, float, float]:
            forward, backward = self.dispatch_seconds(layer, expert)
            return (
                layer.forward + forward,
                layer.input_grad + backward,
                layer.weight_grad,
                layer.backward + backward,
            )

        stages = tuple(
            tuple(map(sum, zip(*(priced(layer) for layer in self.layers[a:b]))))
            for a, b in zip(parts, parts[1:])
        )
        weights = [
            sum(layer.parameter_bytes for layer in self.layers[a:b])
            for a, b in zip(parts, parts[1:])
        ]
        p = len(weights)
        largest = max(weights[i] + weights[p - 1 - i] for i in range(p))
        reduce = self.allreduce_latency + largest / self.allreduce_bandwidth if largest else 0.0
        return Costs(comm=self.comm, per_stage=stages, replica_reduce=reduce)

    def activation_bytes(self, parts: list[int]) -> list[int]:
        """Bytes of one micro-batch's activations per stage."""
        return [
            sum(layer.activation_bytes for layer in self.layers[a:b])
            for a, b in zip(parts, parts[1:])
        ]

    def check_shapes(self, recipe, path: str | Path) -> None:
        """Raise ValueError unless this profile was measured at the recipe's sequence
        length and dtype (costs scale with both; the micro-batch size is checked by
        the caller, since ``pp-ext tune`` varies it)."""
        if (self.seq, self.dtype) != (recipe.data.seq_len, recipe.model.dtype):
            raise ValueError(
                f"profile {path} measured {self.seq} tokens in {self.dtype}, the recipe has "
                f"data.seq_len={recipe.data.seq_len} in {recipe.model.dtype}: profile this recipe "
                f"again (pp-ext tune --recipe R without --profile)"
            )

    def save(self, path: str | Path) -> Path:
        data = {
            "comm": self.comm,
            "micro_batch_size": self.micro_batch_size,
            "seq": self.seq,
            "dtype": self.dtype,
            "allreduce_latency": self.allreduce_latency,
            # JSON has no infinity: a bandwidth too high to measure is null
            "allreduce_bandwidth": None
            if self.allreduce_bandwidth == float("inf")
            else self.allreduce_bandwidth,
            "alltoall_latency": self.alltoall_latency,
            "alltoall_bandwidth": None
            if self.alltoall_bandwidth == float("inf")
            else self.alltoall_bandwidth,
            "layers": [asdict(layer) for layer in self.layers],
        }
        return write_atomic(path, (json.dumps(data, indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        path = Path(path)
        if not path.is_file():
            raise ValueError(
                f"profile {path} does not exist: write one with pp-ext tune --recipe R --profile {path}"
            )
        try:
            data = json.loads(path.read_text())
            return cls(
                tuple(LayerCost(**layer) for layer in data["layers"]),
                float(data["comm"]),
                int(data["micro_batch_size"]),
                int(data["seq"]),
                str(data.get("dtype", "float32")),
                float(data.get("allreduce_latency", 0.0)),
                float(data.get("allreduce_bandwidth") or "inf"),
                float(data.get("alltoall_latency", 0.0)),
                float(data.get("alltoall_bandwidth") or "inf"),
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"profile {path} is not valid ({exc}): write it again with pp-ext tune"
            ) from None
