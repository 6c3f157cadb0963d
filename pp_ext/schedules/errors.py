"""Errors of the schedule layer: each says what is wrong and how to fix it."""


class ScheduleError(ValueError):
    """Base class: a schedule cannot be built or is not valid."""


class ConstraintError(ScheduleError):
    """A schedule refuses these sizes; the message names the constraint and the
    smallest valid value."""


class InvalidScheduleError(ScheduleError):
    """A program breaks a rule (order, counts, dependencies, matching, deadlock).

    ``grid`` is the rank x step grid with the offending actions marked.
    """

    def __init__(self, message: str, grid: str = "") -> None:
        super().__init__(message + (f"\n{grid}" if grid else ""))
        self.reason = message
        self.grid = grid
