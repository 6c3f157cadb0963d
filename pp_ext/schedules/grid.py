"""Text grids: ranks as rows, program steps (or simulated time) as columns."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fractions import Fraction
from math import gcd

MARK = "!"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    width = max([len(cell) for row in rows for cell in row] + [len(h) for h in header] + [1])
    lines = ["     " + " ".join(h.ljust(width) for h in header)]
    for rank, row in enumerate(rows):
        lines.append(f"r{rank:<3} " + " ".join(cell.ljust(width) for cell in row))
    return "\n".join(line.rstrip() for line in lines)


def step_grid(schedule, marked: Iterable[tuple[int, int]] = ()) -> str:
    """Rank x step grid of the programs of ``schedule`` (a
    :class:`~pp_ext.schedules.schedule.Schedule`); ``marked`` (rank, step) cells get a ``!``."""
    marked = set(marked)
    rows = [
        [
            (MARK if (rank, step) in marked else "") + str(action)
            for step, action in enumerate(program)
        ]
        for rank, program in enumerate(schedule.programs)
    ]
    steps = max((len(row) for row in rows), default=0)
    return _table(rows, [str(step) for step in range(steps)])


def _quantum(values: Iterable[Fraction | float]) -> Fraction | float:
    fractions = [Fraction(v).limit_denominator(1000) for v in values if v]
    if not fractions:
        return 1
    denominator = 1
    for f in fractions:
        denominator = denominator * f.denominator // gcd(denominator, f.denominator)
    numerator = 0
    for f in fractions:
        numerator = gcd(numerator, int(f * denominator))
    return Fraction(numerator, denominator)


def time_grid(simulation, max_columns: int = 400) -> str:
    """Rank x time grid from a :class:`~pp_ext.schedules.simulate.Simulation`: one column per time quantum (the largest
    unit that divides every start and duration), ``.`` where the rank is idle and
    ``=`` where an action continues. Returns the step grid if that would be wider
    than ``max_columns``."""
    spans = [span for row in simulation.timeline for span in row]
    quantum = _quantum([s.start for s in spans] + [s.end - s.start for s in spans])
    columns = int(round(simulation.makespan / quantum)) if spans else 0
    if columns > max_columns:
        return step_grid(simulation.schedule)
    rows = []
    for row in simulation.timeline:
        cells = ["."] * columns
        for span in row:
            first = int(round(span.start / quantum))
            last = int(round(span.end / quantum))
            for col in range(first, last):
                cells[col] = str(span.action) if col == first else "="
        rows.append(cells)
    return _table(rows, [str(col) for col in range(columns)])
