"""DeepSpeed integration: chunked pipeline module, split backward, the engine that
runs any lowered pp-ext program, and :func:`initialize`."""
