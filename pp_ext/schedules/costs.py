"""Cost model for the simulator.

Uniform costs are per rank and micro-batch: the time to run F, I or W over one
rank's share of the layers (``stages / ranks`` stages, so a chunk costs
``ranks/stages`` of it: 1/v with v chunks in loop or V placement). ``B = I + W``.
Per-stage costs (e.g. measured by a profiler) give F, I, W for each global stage
and are used as they are. ``comm`` is the latency of one message between ranks;
a hand-over between chunks of one rank costs nothing. Defaults are the unit costs
of the literature's figures (F = I = W = 1, comm = 0). A stage may also give its
fused backward ``B`` as measured (it is often a little cheaper than I + W).

File format (JSON)::

    {"comm": 0.05,
     "stages": [{"forward": 1.0, "input_grad": 1.1, "weight_grad": 0.8, "backward": 1.8}, ...],
     "replica_reduce": 0.3}

(``backward`` and ``replica_reduce`` are optional; ``replica_reduce`` is the time of
summing the two replicas' gradients per step, which only Chimera's two pipelines pay.)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from .actions import Kind

Number = Fraction | float | int


def _number(text: str) -> Number:
    text = text.strip()
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return float(text)


@dataclass(frozen=True)
class Costs:
    forward: Number = Fraction(1)
    input_grad: Number = Fraction(1)
    weight_grad: Number = Fraction(1)
    comm: Number = Fraction(0)
    update: Number = Fraction(0)
    per_stage: tuple[tuple[Number, ...], ...] | None = None  # (F, I, W) or (F, I, W, B) per stage
    # summing the two replicas' gradients once per step where two pipelines hold two
    # replicas of every stage (Chimera, Li & Hoefler 2021, Sec. 3): an all-reduce after
    # the last backward, which nothing overlaps in pp-ext's engine
    replica_reduce: Number = Fraction(0)

    def __post_init__(self) -> None:
        values = [
            self.forward,
            self.input_grad,
            self.weight_grad,
            self.comm,
            self.update,
            self.replica_reduce,
        ]
        values += [v for stage in self.per_stage or () for v in stage]
        if any(v < 0 for v in values):
            raise ValueError("costs must be >= 0")

    def duration(self, kind: Kind, stage: int, ranks: int, stages: int) -> Number:
        """Time of one compute action on global ``stage`` (of ``stages``, on ``ranks``)."""
        if self.per_stage is not None:
            if len(self.per_stage) != stages:
                raise ValueError(
                    f"the cost file gives {len(self.per_stage)} stages, the schedule has {stages} "
                    f"(ranks x chunks): profile or write one entry per stage"
                )
            f, i, w, *fused = self.per_stage[stage]
            share: Number = 1
        else:
            f, i, w, fused = self.forward, self.input_grad, self.weight_grad, []
            share = Fraction(ranks, stages)
        cost = {
            Kind.F: f,
            Kind.I: i,
            Kind.W: w,
            Kind.B: fused[0] if fused else i + w,
            Kind.U: self.update,
        }[kind]
        return cost if kind is Kind.U else cost * share

    def scaled(
        self, kinds: Iterable[Kind], ranks: int, stages: int
    ) -> tuple[dict[tuple[Kind, int], Number], Number, int | None]:
        """Durations of ``kinds`` by (kind, stage) and the comm time, as integers in units
        of 1/scale where every cost is exact (a simulation loop then adds and compares
        integers, far faster than Fractions), else as given (floats; scale None)."""
        table = {
            (kind, stage): self.duration(kind, stage, ranks, stages)
            for kind in kinds
            for stage in range(stages)
        }
        values = [*table.values(), self.comm]
        if not all(isinstance(v, (int, Fraction)) for v in values):
            return table, self.comm, None
        scale = math.lcm(*(Fraction(v).denominator for v in values))
        return {key: int(v * scale) for key, v in table.items()}, int(self.comm * scale), scale

    @classmethod
    def parse(cls, text: str) -> "Costs":
        """``"F,I,W[,comm]"``, e.g. ``"1,1,1"`` or ``"1.2,1.1,0.7,0.05"``."""
        parts = text.split(",")
        if len(parts) not in (3, 4):
            raise ValueError(f"--costs takes F,I,W[,comm] (e.g. 1,1,1,0.1), got {text!r}")
        try:
            numbers = [_number(p) for p in parts]
        except ValueError:
            raise ValueError(f"--costs takes numbers F,I,W[,comm], got {text!r}") from None
        forward, input_grad, weight_grad, *comm = numbers
        if comm:
            return cls(forward, input_grad, weight_grad, comm=comm[0])
        return cls(forward, input_grad, weight_grad)

    @classmethod
    def load(cls, path: str | Path) -> "Costs":
        path = Path(path)
        if not path.is_file():
            raise ValueError(
                f"cost file {path} does not exist: give --costs F,I,W[,comm] or a JSON file"
            )
        try:
            data = json.loads(path.read_text())
            stages = tuple(
                (s["forward"], s["input_grad"], s["weight_grad"])
                + ((s["backward"],) if "backward" in s else ())
                for s in data["stages"]
            )
            return cls(
                comm=data.get("comm", 0),
                per_stage=stages,
                replica_reduce=data.get("replica_reduce", 0),
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"cost file {path} is not valid ({exc}): expected "
                '{"comm": x, "stages": [{"forward": f, "input_grad": i, "weight_grad": w'
                '[, "backward": b]}, ...]}'
            ) from None

    def to_json(self) -> dict:
        """The cost file format (per-stage costs only)."""
        if self.per_stage is None:
            raise ValueError("only per-stage costs are written as a cost file")
        keys = ("forward", "input_grad", "weight_grad", "backward")
        return {
            "comm": float(self.comm),
            "stages": [dict(zip(keys, map(float, s))) for s in self.per_stage],
            **({"replica_reduce": float(self.replica_reduce)} if self.replica_reduce else {}),
        }

    @classmethod
    def from_option(cls, value: str | None) -> "Costs":
        """A ``--costs`` value: F,I,W[,comm] or the path of a JSON cost file."""
        if value is None:
            return cls()
        return (
            cls.load(value) if value.endswith(".json") or Path(value).exists() else cls.parse(value)
        )
