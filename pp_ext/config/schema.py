"""The recipe schema: one dataclass per recipe section (OmegaConf structured config).

Pure data, no torch: ``pp-ext plan`` and the error paths import it in milliseconds.
Loading, merging and checking a recipe is :mod:`pp_ext.config.recipe`; this module only
says which keys exist, their types and their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    # a folder with config.json (+ safetensors weights, tokenizer files); without
    # weights the model starts from a seeded random init (layout-independent)
    path: str = "???"
    # tokenizer folder; None: the model folder
    tokenizer: Optional[str] = None
    # float32 | bfloat16 | float16: the dtype the weights are loaded in
    dtype: str = "float32"
    # sdpa | eager | flash_attention_2; None: the family's HF default (sdpa, or eager
    # where HF's sdpa cannot do the family's attention, e.g. Gemma2's soft-capping)
    attn_implementation: Optional[str] = None
    # activation checkpointing every N layers (0: off)
    activation_checkpoint_interval: int = 0


@dataclass
class DataConfig:
    # local file, folder or glob (jsonl/json/csv/parquet/txt), or a hub dataset name;
    # required unless train.steps=0 (a conversion: load, export, exit)
    path: Optional[str] = None
    # auto (from the file extension) | json | csv | parquet | text | hub
    format: str = "auto"
    # auto (from the columns) | text | prompt_completion | chat
    kind: str = "auto"
    split: str = "train"
    # held-out evaluation data: a split name of the same dataset, or a fraction of it
    eval_split: Optional[str] = None
    eval_fraction: float = 0.0
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    # tokens per sample (fixed shapes: every micro-batch is micro_batch_size x seq_len)
    seq_len: int = 512
    # True: plain text is concatenated and cut into seq_len blocks, records are packed
    # several per sample (positions restart per document); False: one document or
    # record per sample, truncated or padded to seq_len (see pp_ext/data.py)
    pack: bool = True
    # tokenization workers (datasets.map num_proc); 1 = in process
    num_proc: int = 1


@dataclass
class ParallelConfig:
    pipeline: int = 1
    tensor: int = 1
    # data-parallel ranks; "auto": world size / (pipeline x tensor)
    data: Any = "auto"
    schedule: str = "1f1b"
    # micro-batches per step (DeepSpeed's gradient_accumulation_steps)
    micro_batches: int = 4
    # model chunks per pipeline rank; None: the schedule's default (auto from a profile: its choice)
    chunks: Optional[int] = None
    # parameters | uniform | type:REGEX | balanced:PROFILE.json | [boundaries]
    partition: Any = "parameters"
    # a profile of this model at these shapes (written by `pp-ext tune`): with schedule
    # auto, the schedule is computed from its measured per-stage costs (Qi et al. 2024,
    # Sec. 3) instead of unit costs
    profile: Optional[str] = None
    # auto's memory limit per rank in micro-batches of that rank's activations (a number
    # or one per pipeline rank); None: 1F1B's (pipeline micro-batches)
    memory_limit: Any = None
    # seconds any rank waits for a peer (p2p receive, collective) before it stops with
    # an error naming itself, its stage and what it waited for (a dead or stalled rank)
    comm_timeout_s: int = 1800


@dataclass
class TrainConfig:
    # optimizer steps; 0: load, export and exit (a conversion). Or set epochs.
    steps: Optional[int] = None
    epochs: Optional[float] = None
    micro_batch_size: int = 1
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # adamw | sgd
    optimizer: str = "adamw"
    grad_clip: float = 1.0
    # evaluate every N steps (0: only at the end when there is eval data)
    eval_interval: int = 0
    eval_batches: int = 8
    seed: int = 1234
    # a step whose gradients are not finite never updates the weights; then
    # stop: exit with an error (resume from the last checkpoint) | skip: report it, go on
    nonfinite: str = "stop"
    # a progress line every N steps when stderr is not a terminal (else a live bar)
    log_interval: int = 10


@dataclass
class CheckpointConfig:
    # default: <output_dir>/checkpoints
    dir: Optional[str] = None
    # save every N steps (0: only at the end)
    interval: int = 0
    # how many checkpoints to keep (0: all)
    keep: int = 2
    # auto: the newest complete checkpoint if there is one | never | a checkpoint path
    resume: str = "auto"


@dataclass
class LoggingConfig:
    progress: bool = True
    tensorboard: bool = False
    csv: bool = True


@dataclass
class Recipe:
    output_dir: str = "???"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # DeepSpeed config: bases from configs/deepspeed/ (e.g. [fp32-cpu]) merged in order,
    # then `deepspeed.overrides` on top; pp-ext fills batch sizes, clipping and optimizer
    deepspeed: dict = field(default_factory=lambda: {"bases": ["fp32-cpu"], "overrides": {}})
