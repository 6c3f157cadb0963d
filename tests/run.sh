#!/usr/bin/env bash
# The README's test command: set up (or reuse) .venv, check the import layers
# (.importlinter: a new upward import fails here, with import-linter's message), the
# formatting and lint (ruff) and the types (mypy; both configured in pyproject.toml),
# then run the whole suite. Extra arguments go to pytest (e.g. -m "not slow" for
# the quick local subset) and run it in one session.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/env.sh"
cd "$root"
lint-imports --no-logo --no-cache .importlinter
ruff format --check --quiet .
ruff check --quiet .
mypy
pytest_run() {  # pytest ARGS...: its exit status, and "collected no tests" a failure
    local status=0
    python -m pytest "$@" || status=$?
    if [ "$status" -eq 5 ]; then
        echo "tests/run.sh: pytest collected no tests: failing on purpose" >&2
        status=1
    fi
    return "$status"
}
if [ "$#" -gt 0 ]; then
    pytest_run "$@"
    exit
fi
# The whole suite (CI): the quick subset, one process that starts none, runs beside the slow
# tests, whose ranks leave about a fifth of the 2 cores idle (waits at stage boundaries); its
# own temporary folder and no cache, so the two sessions share nothing. Its report follows.
quick_dir="$(mktemp -d)"
pytest_run -m "not slow" -p no:cacheprovider --basetemp="$quick_dir/tmp" > "$quick_dir/log" 2>&1 &
quick=$!
slow_status=0 quick_status=0
pytest_run -m slow || slow_status=$?
wait "$quick" || quick_status=$?
cat "$quick_dir/log"
rm -rf "$quick_dir"
[ "$slow_status" -eq 0 ] && [ "$quick_status" -eq 0 ]
