"""Registry: schedules by name, each with its constraints checked up front.

A schedule family is one generator function registered with :func:`register`;
:func:`build` checks the sizes, generates the compute program and validates it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from .errors import ConstraintError, ScheduleError
from .schedule import Schedule
from .validate import validate

# DeepSpeed's own engine and TrainSchedule (1F1B, one chunk): a recipe's parallel.schedule may
# name it, and the benches compare every schedule with it; it is not in the registry
BASELINE = "deepspeed-1f1b"

Generator = Callable[[int, int, int], Schedule]
Check = Callable[[int, int, int], None]


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    summary: str
    constraints: str
    source: str
    placement: str
    default_chunks: int
    generate: Generator
    check: Check
    # False: weights change inside a step (the asynchronous family), so the result is
    # not ordinary training and the synchronous engine, tests and tools leave it out
    synchronous: bool = True
    # chunk counts that run in another placement than ``placement`` (auto: 2 -> "v")
    placements: tuple[tuple[int, str], ...] = ()

    def resolve_chunks(self, chunks: int | None) -> int:
        return self.default_chunks if chunks is None else chunks

    def placement_for(self, chunks: int | None) -> str:
        """The placement the module needs for this schedule with ``chunks`` (None: default)."""
        return dict(self.placements).get(self.resolve_chunks(chunks), self.placement)

    def build(self, stages: int, micro_batches: int, chunks: int | None = None) -> Schedule:
        """Check the sizes, generate and validate; returns the compute program."""
        return _built(self, stages, micro_batches, self.resolve_chunks(chunks))


@lru_cache(
    maxsize=256
)  # a schedule is data: the same family and sizes are generated and validated once
def _built(spec: ScheduleSpec, stages: int, micro_batches: int, chunks: int) -> Schedule:
    check_sizes(spec.name, stages, micro_batches, chunks)
    spec.check(stages, micro_batches, chunks)
    schedule = spec.generate(stages, micro_batches, chunks)
    validate(schedule)
    return schedule


REGISTRY: dict[str, ScheduleSpec] = {}


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConstraintError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConstraintError(message)


def check_sizes(name: str, stages: int, micro_batches: int, chunks: int) -> None:
    require(stages >= 1, f"{name} needs stages >= 1 (got {stages})")
    require(micro_batches >= 1, f"{name} needs micro_batches >= 1 (got {micro_batches})")
    require(chunks >= 1, f"{name} needs chunks >= 1 (got {chunks})")


def fixed_chunks(name: str, value: int) -> Check:
    """A check for families that hold exactly ``value`` chunks per rank."""

    def check(stages: int, micro_batches: int, chunks: int) -> None:
        require(
            chunks == value,
            f"{name} holds exactly {value} chunk{'s' if value > 1 else ''} per rank "
            f"(got chunks={chunks}): use chunks={value}",
        )

    return check


def register(
    name: str,
    *,
    summary: str,
    constraints: str,
    source: str,
    placement: str,
    default_chunks: int = 1,
    check: Check | None = None,
    synchronous: bool = True,
    placements: tuple[tuple[int, str], ...] = (),
) -> Callable[[Generator], Generator]:
    def decorate(generate: Generator) -> Generator:
        if name in REGISTRY:
            raise ValueError(f"schedule {name!r} registered twice")
        REGISTRY[name] = ScheduleSpec(
            name,
            summary,
            constraints,
            source,
            placement,
            default_chunks,
            generate,
            check or (lambda p, m, v: None),
            synchronous,
            placements,
        )
        return generate

    return decorate


def names(synchronous: bool | None = None) -> list[str]:
    """Registered schedule names; ``synchronous`` True or False keeps only those."""
    return [
        n for n, spec in REGISTRY.items() if synchronous is None or spec.synchronous == synchronous
    ]


def get(name: str) -> ScheduleSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ScheduleError(
            f"unknown schedule {name!r}: {hint}choose one of {', '.join(REGISTRY)}"
        ) from None


def build(name: str, stages: int, micro_batches: int, chunks: int | None = None) -> Schedule:
    """Build and validate the named schedule (compute actions; see ``lower``)."""
    return get(name).build(stages, micro_batches, chunks)
