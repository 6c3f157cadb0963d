"""The tested version range of what pp-ext runs on, checked at start-up.

The range has one home, ``install_requires`` in ``setup.cfg``: pip enforces it when
pp-ext is installed, and :func:`require_versions` reads it back from pp-ext's installed
metadata (``importlib.metadata.requires``), so that a package changed afterwards (a
transformers 4.x installed over it) is one line naming the installed and the needed
version, instead of a traceback deep inside a pipeline stage. Nothing is imported to
find a version: the check costs milliseconds and runs before torch, deepspeed or
transformers are imported.
"""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement

DISTRIBUTION = "pp-ext"


class UnsupportedVersion(ImportError):
    """An installed package outside the version range pp-ext is tested on."""


def _requirements() -> list[Requirement]:
    try:
        lines = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:  # run from a source tree never installed: no range
        return []
    required = (Requirement(line) for line in lines)
    return [r for r in required if r.marker is None]  # the extras' are not needed to run


def unsupported(installed: dict[str, str], requirements: list[Requirement]) -> list[Requirement]:
    """The requirements that ``installed`` (name -> version; a missing package absent)
    does not meet."""
    return [
        r
        for r in requirements
        if r.name not in installed or not r.specifier.contains(installed[r.name], prereleases=True)
    ]


def require_versions() -> None:
    """Raises :class:`UnsupportedVersion` (one line) if a required package is missing or
    outside pp-ext's tested range."""
    requirements = _requirements()
    installed = {}
    for r in requirements:
        try:
            installed[r.name] = metadata.version(r.name)
        except metadata.PackageNotFoundError:
            pass
    if bad := unsupported(installed, requirements):
        found = "; ".join(
            f"{r.name} {installed[r.name] + ' is' if r.name in installed else 'is not'} "
            f"installed, pp-ext needs {r}"
            for r in bad
        )
        raise UnsupportedVersion(f"{found}: pip install {' '.join(repr(str(r)) for r in bad)}")
