#!/usr/bin/env bash
# The README's main command: set up (or reuse) .venv, then run the default job.
# Today the default job is the schedule core: it compares every registered
# schedule at 4 stages x 8 micro-batches and draws their timelines into
# runs/quickstart/. (Training the default recipe arrives with the main-job issue.)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/env.sh"
out="${1:-$root/runs/quickstart}"
mkdir -p "$out"
pp-ext schedule compare --stages 4 --micro-batches 8
for name in $(python -c "from pp_ext.schedules import names; print(*names())"); do
    pp-ext schedule show "$name" --stages 4 --micro-batches 8 --svg "$out/$name.svg" >/dev/null
done
pp-ext schedule show zb-h1 --stages 4 --micro-batches 8
echo "timelines of every schedule: $out/*.svg"
