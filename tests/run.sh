#!/usr/bin/env bash
# The README's test command: set up (or reuse) .venv, check the import layers
# (.importlinter: a new upward import fails here, with import-linter's message), the
# formatting and lint (ruff) and the types (mypy; both configured in pyproject.toml),
# then run the whole suite. Extra arguments go to pytest (e.g. -m "not slow" for
# the quick local subset).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/env.sh"
cd "$root"
lint-imports --no-logo --no-cache .importlinter
ruff format --check --quiet .
ruff check --quiet .
mypy
set +e
python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "tests/run.sh: pytest collected no tests: failing on purpose" >&2
    exit 1
fi
exit "$status"
