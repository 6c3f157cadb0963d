"""A mixin put first in the bases of a class known only at run time (HF's or
transformers' module classes), made once per pair so that every instance shares one
class: ``isinstance`` holds across modules and pickling finds it by name."""

from __future__ import annotations

import functools


def mixed(mixin: type, base: type, prefix: str, about: str, **namespace: object) -> type:
    """``class <prefix><Base>(mixin, base)`` in the mixin's module, documented as
    ``"<Base> <about>"``; ``namespace``: more class attributes."""
    return _mixed(mixin, base, prefix, about, tuple(sorted(namespace.items())))


@functools.cache
def _mixed(mixin: type, base: type, prefix: str, about: str, namespace: tuple) -> type:
    return type(
        f"{prefix}{base.__name__}",
        (mixin, base),
        {"__module__": mixin.__module__, "__doc__": f"{base.__name__} {about}", **dict(namespace)},
    )
