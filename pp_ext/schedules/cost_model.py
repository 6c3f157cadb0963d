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

File format (JSON)::

    {"comm": s, "micro_batch_size": b, "seq": t, "dtype": "float32",
     "allreduce_latency": s, "allreduce_bandwidth": bytes/s,
     "layers": [{"name": "Embedding", "forward": s, "input_grad": s, "weight_grad": s,
                 "backward": s, "activation_bytes": n, "parameter_bytes": n}, ...]}

(a file without the all-reduce fields or ``parameter_bytes``, written before they
existed, prices the replica sum at 0).
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


@dataclass(frozen=True)
class Profile:
    layers: tuple[LayerCost, ...]
    comm: float
    micro_batch_size: int
    seq: int
    dtype: str = "float32"
    allreduce_latency: float = 0.0
    allreduce_bandwidth: float = float("inf")

    def layer_costs(self, count: int) -> list[float]:
        """Seconds of one training micro-batch (forward + fused backward) per layer."""
        if count != len(self.layers):
            raise ValueError(
                f"the profile measures {len(self.layers)} layers, the model has {count}: "
                f"profile this model again (pp-ext tune --recipe ...)"
            )
        return [layer.forward + layer.backward for layer in self.layers]

    def stage_costs(self, parts: list[int]) -> Costs:
        """Per-stage F, I, W, B (sums over each stage's layers) for the simulator, and
        the replica sum of a two-pipeline (bidirectional) schedule on this cut: rank i
        all-reduces the gradients of stages i and p-1-i in one flat buffer with its
        partner, all pairs at once, so the slowest pair's time (paid only where a
        schedule has two pipelines, :func:`pp_ext.schedules.simulate`)."""
        self.layer_costs(parts[-1])
        stages = tuple(
            tuple(
                sum(getattr(layer, key) for layer in self.layers[a:b])
                for key in ("forward", "input_grad", "weight_grad", "backward")
            )
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
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"profile {path} is not valid ({exc}): write it again with pp-ext tune"
            ) from None
