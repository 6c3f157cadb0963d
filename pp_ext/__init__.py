"""pp-ext: pipeline-parallel training schedules for DeepSpeed and Hugging Face models."""

__version__ = "0.1.0"
