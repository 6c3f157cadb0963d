"""The main job's entry point for the ``deepspeed`` launcher (one process per rank)::

    deepspeed --num_gpus 2 launch/train.py --recipe recipes/quickstart.yaml [key=value ...]
    deepspeed --hostfile launch/hostfile launch/train.py --recipe recipes/llama-8b-pipe4-data2.yaml

See :mod:`pp_ext.training.entry`.
"""

import sys

from pp_ext.engine.distributed import select_accelerator

select_accelerator()  # before pp_ext.training.entry imports deepspeed (its auto-detection warns on stdout)
from pp_ext.training.entry import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
