"""The main job's entry point for the ``deepspeed`` launcher (one process per rank)::

    deepspeed --num_gpus 2 launch/train.py --recipe recipes/quickstart.yaml [key=value ...]
    deepspeed --hostfile launch/hostfile launch/train.py --recipe recipes/llama-8b-pipe4-data2.yaml

See :mod:`pp_ext.training.entry`.
"""

import sys

from pp_ext.tools.logging import get_logger
from pp_ext.tools.versions import UnsupportedVersion, require_versions

try:
    require_versions()  # before a stage meets an API it lacks (transformers 4.x, ...)
    from pp_ext.engine.distributed import select_accelerator, shut_down

    select_accelerator()  # before pp_ext.training.entry imports deepspeed (its auto-detection warns on stdout)
    from pp_ext.training.entry import main
except UnsupportedVersion as exc:  # one line from rank 0, not an import traceback on every rank
    get_logger().error(f"error: {exc}")
    sys.exit(2)

if __name__ == "__main__":
    code = main()
    if code == 0:  # every rank finished together (a failed one may have lost its peers)
        shut_down()
    sys.exit(code)
