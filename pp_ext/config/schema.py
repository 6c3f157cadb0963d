"""The recipe schema: one dataclass per recipe section (OmegaConf structured config).

Pure data, no torch: ``pp-ext plan`` and the error paths import it in milliseconds. Each
field's docstring (the string under it) says what it means.
Loading, merging and checking a recipe is :mod:`pp_ext.config.recipe`; this module only
says which keys exist, their types and their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelConfig:
    path: str = "???"
    """a folder with config.json (+ safetensors weights, tokenizer files); without weights the
    model starts from a seeded random init (layout-independent)"""
    tokenizer: Optional[str] = None
    """tokenizer folder; None: the model folder"""
    dtype: str = "float32"
    """float32 | bfloat16 | float16: the dtype the weights are loaded in"""
    attn_implementation: Optional[str] = None
    """sdpa | eager | flash_attention_2; None: the family's HF default (sdpa, or eager where
    HF's sdpa cannot do the family's attention, e.g. Gemma2's soft-capping)"""
    activation_checkpoint_interval: int = 0
    """activation checkpointing every N layers (0: off)"""


@dataclass
class DataConfig:
    path: Optional[str] = None
    """local file, folder or glob (jsonl/json/csv/parquet/txt), or a hub dataset name; required
    unless train.steps=0 (a conversion: load, export, exit)"""
    format: str = "auto"
    """auto (from the file extension) | json | csv | parquet | text | hub"""
    kind: str = "auto"
    """auto (from the columns) | text | prompt_completion | chat"""
    split: str = "train"
    eval_split: Optional[str] = None
    """held-out evaluation data: a split name of the same dataset, or a fraction of it"""
    eval_fraction: float = 0.0
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    seq_len: int = 512
    """tokens per sample (fixed shapes: every micro-batch is micro_batch_size x seq_len)"""
    pack: bool = True
    """True: plain text is concatenated and cut into seq_len blocks, records are packed several
    per sample (positions restart per document); False: one document or record per sample,
    truncated or padded to seq_len (see pp_ext/data/batches.py)"""
    num_proc: int = 1
    """tokenization workers (datasets.map num_proc); 1 = in process"""


@dataclass
class ParallelConfig:
    pipeline: int = 1
    tensor: int = 1
    data: Any = "auto"
    """data-parallel ranks; "auto": world size / (pipeline x tensor)"""
    expert: int = 1
    """expert parallelism (DeepSpeed-MoE, Megatron): each MoE layer's routed experts spread over
    this many of a stage's data ranks (same pipeline stage and tensor rank), tokens sent to their
    experts and back by all-to-all; it must divide the data ranks and the routed experts"""
    schedule: str = "1f1b"
    micro_batches: int = 4
    """micro-batches per step (DeepSpeed's gradient_accumulation_steps)"""
    chunks: Optional[int] = None
    """model chunks per pipeline rank; None: the schedule's default (auto from a profile: its
    choice)"""
    partition: Any = "parameters"
    """parameters | uniform | type:REGEX | balanced:PROFILE.json | [boundaries]"""
    profile: Optional[str] = None
    """a profile of this model at these shapes (written by `pp-ext tune`): with schedule auto,
    the schedule is computed from its measured per-stage costs (Qi et al. 2024, Sec. 3) instead
    of unit costs"""
    memory_limit: Any = None
    """auto's memory limit per rank in micro-batches of that rank's activations (a number or one
    per pipeline rank); None: 1F1B's (pipeline micro-batches)"""
    make_vocab_size_divisible_by: int = 1
    """pad the vocabulary (embedding and LM head rows) to a multiple of this x tensor, as
    Megatron does (its default: 128); the padded rows are zeros, their logits masked, and
    stripped on export. 1: padded only where tensor does not divide it"""
    comm_timeout_s: int = 1800
    """seconds any rank waits for a peer (p2p receive, collective) before it stops with an error
    naming itself, its stage and what it waited for (a dead or stalled rank)"""


@dataclass
class MoEConfig:
    bias_update_speed: float = 0.0
    """DeepSeek-V3's auxiliary-loss-free load balancing (arXiv 2412.19437, Sec. 2.1.2): after each
    step every router's e_score_correction_bias moves by this gamma, b_i += gamma *
    sign(mean_load - load_i), the loads counted over the step's tokens (the paper: 0.001); 0: off,
    the bias stays as loaded (as HF's training leaves it). Models with such a bias only"""


@dataclass
class TrainConfig:
    steps: Optional[int] = None
    """optimizer steps; 0: load, export and exit (a conversion). Or set epochs."""
    epochs: Optional[float] = None
    micro_batch_size: int = 1
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    optimizer: str = "adamw"
    """adamw | sgd"""
    grad_clip: float = 1.0
    eval_interval: int = 0
    """evaluate every N steps (0: only at the end when there is eval data)"""
    eval_batches: int = 8
    seed: int = 1234
    nonfinite: str = "stop"
    """a step whose gradients are not finite never updates the weights; then stop: exit with an
    error (resume from the last checkpoint) | skip: report it, go on"""
    log_interval: int = 10
    """a progress line every N steps when stderr is not a terminal (else a live bar)"""


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """default: <output_dir>/checkpoints"""
    interval: int = 0
    """save every N steps (0: only at the end)"""
    keep: int = 2
    """how many checkpoints to keep (0: all)"""
    resume: str = "auto"
    """auto: the newest complete checkpoint if there is one | never | a checkpoint path"""


@dataclass
class LoggingConfig:
    progress: bool = True
    tensorboard: bool = False
    csv: bool = True


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning; the names and meanings are PEFT's ``LoraConfig``'s
    (Hu et al. 2021, "LoRA", arXiv:2106.09685: W x + (lora_alpha / r) B A x)."""

    type: str = "none"
    """none: full fine-tuning | lora"""
    r: int = 8
    """the adapters' rank"""
    lora_alpha: float = 8
    """the scale's numerator: lora_alpha / r (lora_alpha / sqrt(r) with use_rslora)"""
    lora_dropout: float = 0.0
    target_modules: Any = None
    """module names (a list: a name or its dotted suffix), a regex (a string: full match), or
    all-linear (every linear layer but the LM head); None: PEFT's default for the family"""
    target_parameters: Optional[list] = None
    """parameters adapted directly (PEFT's ParamWrapper), by name or dotted suffix: an MoE
    model's fused 3-D experts, [experts.gate_up_proj, experts.down_proj]; [] adapts none"""
    use_rslora: bool = False
    """scale lora_alpha / sqrt(r) (Kalajdzievski 2023, "Rank-Stabilized LoRA", arXiv:2312.03732)"""
    modules_to_save: Optional[list] = None
    """modules trained in full besides the adapters (e.g. [lm_head])"""
    adapter_path: Optional[str] = None
    """start from this PEFT adapter folder (adapter_config.json, adapter_model.safetensors)"""
    merge: bool = False
    """the run's final export (<output_dir>/hf): false: the PEFT adapter folder; true: the
    merged full model, W + scale B A (PEFT's merge_and_unload), that from_pretrained loads"""


@dataclass
class Recipe:
    output_dir: str = "???"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    deepspeed: dict = field(default_factory=lambda: {"bases": ["fp32-cpu"], "overrides": {}})
    """DeepSpeed config: bases from configs/deepspeed/ (e.g. [fp32-cpu]) merged in order, then
    `deepspeed.overrides` on top; pp-ext fills batch sizes, clipping and optimizer"""
