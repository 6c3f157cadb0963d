"""pp-ext: pipeline-parallel training schedules for DeepSpeed and Hugging Face models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # pp_ext.initialize imports torch and deepspeed: only when asked for, so that
    # the schedule layer and `pp-ext schedule ...` stay light
    if name == "initialize":
        from .engine.initialize import initialize

        return initialize
    raise AttributeError(f"module 'pp_ext' has no attribute {name!r}")
