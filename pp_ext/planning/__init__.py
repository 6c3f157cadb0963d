"""Planning, pure (no torch, deepspeed or transformers): how layers are cut into stages and
placed on ranks (:mod:`.partition`), what a rank holds in memory (:mod:`.memory`), and the
search over schedules, micro-batch sizes and cuts on measured costs (:mod:`.search`)."""
