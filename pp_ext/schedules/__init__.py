"""Pure-Python schedule layer: IR, generators, lowering, validator, simulator.

Imports neither torch nor deepspeed, so every schedule can be checked in
milliseconds anywhere.
"""

# generators register themselves on import; this order is the order `pp-ext schedule list` shows
from . import classic, interleaved, zero_bubble, zbv, dualpipev, chimera, asynchronous, auto  # noqa: F401, I001
from .actions import Action, Kind
from .costs import Costs
from .errors import ConstraintError, InvalidScheduleError, ScheduleError
from .fuse import fuse_backward
from .lower import lower
from .placement import Placement
from .registry import REGISTRY, ScheduleSpec, build, get, names, register
from .schedule import Message, Schedule
from .simulate import Simulation, simulate
from .validate import dry_run, validate

__all__ = [
    "Action",
    "Kind",
    "Costs",
    "ConstraintError",
    "InvalidScheduleError",
    "ScheduleError",
    "fuse_backward",
    "lower",
    "Placement",
    "REGISTRY",
    "ScheduleSpec",
    "build",
    "get",
    "names",
    "register",
    "Message",
    "Schedule",
    "Simulation",
    "simulate",
    "dry_run",
    "validate",
]
