"""Measuring: every schedule timed on one model (:mod:`.pipeline`), one device against
transformers' model (:mod:`.model`), a recipe's layers profiled for ``pp-ext tune``
(:mod:`.profiler`), and the timing primitives they share (:mod:`.measure`)."""
