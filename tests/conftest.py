"""Every test runs pp-ext's point-to-point under NCCL's rules, emulated on gloo
(pp_ext.engine.nccl_emulation): a send completes only once its receiver has taken it,
and a rank's ops complete in posting order. Gloo alone buffers sends and would pass
programs that hang on GPUs. Spawned ranks and launched jobs inherit it;
``PP_EXT_P2P= bash tests/run.sh`` runs plain gloo instead."""
import os

os.environ.setdefault("PP_EXT_P2P", "emulate-nccl")
