"""Test support, kept out of the engine: a tiny model (:mod:`.tiny`), single-process
references (:mod:`.reference`, :mod:`.async_reference`) and local ranks joined by a process
group (:mod:`.spawn`, which ``pp-ext bench`` and ``tune`` use too). NCCL's emulation on gloo
stays in the engine (:mod:`pp_ext.engine.nccl_emulation`): it is a p2p mode, ``PP_EXT_P2P=emulate-nccl``."""
