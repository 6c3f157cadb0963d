"""The main job's entry point for the ``deepspeed`` launcher (one process per rank)::

    deepspeed --num_gpus 2 launch/train.py --recipe recipes/quickstart.yaml [key=value ...]
    deepspeed --hostfile launch/hostfile launch/train.py --recipe recipes/llama-8b-pipe4-data2.yaml

See :mod:`pp_ext.training.entry`.
"""

import sys

from pp_ext.engine.boundary import DeepSpeedTooOld
from pp_ext.engine.distributed import select_accelerator

select_accelerator()  # before pp_ext.training.entry imports deepspeed (its auto-detection warns on stdout)
try:
    from pp_ext.training.entry import main
except DeepSpeedTooOld as exc:  # one line, not an import traceback on every rank
    print(f"pp-ext: error: {exc}", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
