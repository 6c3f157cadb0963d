"""DeepSpeed integration: chunked pipeline module, the engine that
runs any lowered pp-ext program, point-to-point, the process group, and :func:`initialize`."""
