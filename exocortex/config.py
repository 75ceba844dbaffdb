"""One config system for every stage: dataclasses, presets, and `--set key=value` overrides.

A run directory keeps the resolved config (config.json), so any stage can be re-run alone and reads
exactly what the earlier stages used.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ExocortexError(Exception):
    """An error with a message meant for the user: the CLI prints it on one line, no traceback."""


@dataclass
class ModelConfig:
    # Architecture is exactly HF transformers' Qwen3ForCausalLM (see docs/architecture.md), so exports are lossless.
    depth: int = 4               # number of transformer blocks: the one knob the GPU presets turn
    width: int = 0               # model dim; 0 = depth * aspect_ratio
    aspect_ratio: int = 64       # width per layer, as nanochat sizes its models
    head_dim: int = 64
    n_kv_heads: int = 0          # 0 = same as query heads (no grouping); set smaller for GQA
    mlp_ratio: float = 3.0       # SwiGLU hidden = round(mlp_ratio * width)
    vocab_size: int = 8192
    seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def n_embd(self) -> int:
        return self.width or self.depth * self.aspect_ratio

    @property
    def n_heads(self) -> int:
        return max(1, self.n_embd // self.head_dim)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.mlp_ratio * self.n_embd / 64)) * 64 or 64

    def validate(self) -> None:
        if self.n_embd % self.head_dim:
            raise ExocortexError(f"model width {self.n_embd} is not a multiple of head_dim {self.head_dim}")
        if self.n_heads % self.kv_heads:
            raise ExocortexError(f"n_kv_heads={self.kv_heads} must divide the number of heads {self.n_heads}")
        if self.head_dim % 2:
            raise ExocortexError("head_dim must be even for rotary embeddings")


@dataclass
class DataConfig:
    path: str = ""               # user's text (file or directory of .txt/.md/.jsonl/.parquet); empty = generated world
    world_seed: int = 0
    world_bytes: int = 24_000_000  # how much world text to generate
    val_fraction: float = 0.01
    packing: str = "bestfit"     # pretraining rows: bestfit (each starts at a document, no padding) | stream
    workers: int = 0             # tokenizer processes; 0 = one per available CPU core

    def validate(self) -> None:
        if self.packing not in PACKINGS:
            raise ExocortexError(f"data.packing={self.packing!r}: choose one of {', '.join(PACKINGS)}")
        if not 0 < self.val_fraction < 1:
            raise ExocortexError(f"data.val_fraction={self.val_fraction}: must be between 0 and 1")


PACKINGS = ("bestfit", "stream")


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192       # including special tokens
    train_bytes: int = 20_000_000  # train the BPE on at most this much text


@dataclass
class TrainConfig:
    """Shared by every training stage (pretrain, sft): they differ only in data and loss mask."""
    batch_tokens: int = 16384    # tokens per optimizer step (gradient accumulation reaches it)
    device_batch: int = 16       # rows per forward pass
    tokens_per_param: float = 0.0  # token budget = ratio * params; 0 = use max_steps / time_minutes
    max_steps: int = 0           # 0 = derived from tokens_per_param or epochs
    time_minutes: float = 0.0    # alternative budget: choose steps to fit this many minutes (measured)
    epochs: float = 1.0          # for finetuning stages: passes over the conversation set
    matrix_lr: float = 0.02      # Muon, for 2-D weights inside the blocks
    embedding_lr: float = 0.2    # AdamW, token embeddings (scaled by (width/768)^-0.5)
    unembedding_lr: float = 0.004  # AdamW, lm_head (scaled likewise)
    scalar_lr: float = 0.02      # AdamW, norm gains
    weight_decay: float = 0.0
    warmup_frac: float = 0.02
    warmdown_frac: float = 0.3
    final_lr_frac: float = 0.0
    eval_every: int = 100
    eval_tokens: int = 65536
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    dtype: str = "auto"          # auto | bfloat16 | float32
    compile: bool = False
    grad_clip: float = 1.0
    parallel: str = "ddp"        # ddp (replicated weights) | fsdp (FSDP2: weights, grads, optimizer state sharded)


MIDTRAIN_MIXTURE = ("arithmetic=0.12,word_problems=0.16,spelling=0.12,facts=0.16,facts_mc=0.1,lookup=0.16,"
                    "smalltalk=0.1,identity=0.08")
SFT_MIXTURE = "word_problems=0.3,lookup=0.2,arithmetic=0.12,facts=0.12,spelling=0.1,smalltalk=0.1,identity=0.06"


@dataclass
class SFTDataConfig:
    """Conversations for a finetuning stage (midtrain or sft): a weighted task mixture (see exocortex/tasks)."""
    mixture: str = SFT_MIXTURE
    n_conversations: int = 12000
    text_fraction: float = 0.0   # share of rows that are plain pretraining text: keeps what the base model knew
    seed: int = 1
    identity_name: str = "exocortex"


@dataclass
class RLConfig:
    """GRPO-style RL on a task's grader: a group of samples per prompt, group-normalised advantages."""
    task: str = "word_problems"
    steps: int = 0               # 0 = use time_minutes
    time_minutes: float = 3.0
    prompts_per_step: int = 8
    samples_per_prompt: int = 8  # the group
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0               # 0 = full distribution
    lr_scale: float = 0.1        # learning rates relative to the sft stage's (Muon's updates have a fixed size: keep RL's small)
    kl_coef: float = 0.0         # per-token KL penalty to the sft model (0 = off, as DAPO/nanochat)
    eval_every: int = 20
    eval_n: int = 100            # held-out prompts for the periodic eval
    checkpoint_every: int = 10
    guard: bool = True           # stop and keep the last good checkpoint when rewards rise while samples degenerate
    seed: int = 7


@dataclass
class EvalConfig:
    # held-out questions per chat task (name=count); lookup is also scored with its tool switched off
    chat_tasks: str = "arithmetic=100,word_problems=200,spelling=100,facts=100,facts_mc=100,lookup=100,identity=20"
    pass_k: int = 4              # pass@k on word problems: k samples at temperature 1 per question
    pass_k_n: int = 50
    core_n: int = 100            # in-context items per base-eval (CORE-style) task
    core_bundle: str = ""        # path to a DCLM CORE eval bundle (core.yaml + eval_data/) to add its tasks
    max_new_tokens: int = 128
    seed: int = 12345


@dataclass
class LoggingConfig:
    """Metrics beside logs/<stage>.jsonl (rank 0 only); both are optional packages."""
    tensorboard: str = "auto"    # auto (on when `tensorboard` is installed) | on | off; writes runs/<name>/tensorboard/
    wandb_project: str = ""      # Weights & Biases project (or set WANDB_PROJECT); needs `pip install wandb`
    wandb_run: str = ""          # run name shown in wandb; default: the run's name


@dataclass
class RunConfig:
    name: str = "tiny"
    runs_dir: str = "runs"
    preset: str = "tiny"
    seed: int = 42
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    midtrain: TrainConfig = field(default_factory=TrainConfig)
    midtrain_data: SFTDataConfig = field(default_factory=lambda: SFTDataConfig(mixture=MIDTRAIN_MIXTURE))
    sft: TrainConfig = field(default_factory=TrainConfig)
    sft_data: SFTDataConfig = field(default_factory=SFTDataConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- presets

def _tiny() -> RunConfig:
    """Fits a 2-core CPU: the whole speedrun in ~15 minutes. Shape chosen by measurement (docs/tiny.md)."""
    c = RunConfig(name="tiny", preset="tiny")
    c.model = ModelConfig(depth=4, width=256, head_dim=64, vocab_size=4096, seq_len=256, mlp_ratio=3.0)
    c.tokenizer.vocab_size = 4096
    c.tokenizer.train_bytes = 8_000_000
    c.data.world_bytes = 20_000_000
    c.pretrain = TrainConfig(batch_tokens=8192, device_batch=32, time_minutes=5.5, eval_every=100,
                             eval_tokens=32768, checkpoint_every=200, warmdown_frac=0.4, compile=True)
    finetune = dict(batch_tokens=8192, device_batch=32, matrix_lr=0.01, embedding_lr=0.1, unembedding_lr=0.002,
                    scalar_lr=0.01, warmup_frac=0.0, warmdown_frac=0.5, eval_every=50, eval_tokens=16384,
                    checkpoint_every=400, compile=True)
    c.midtrain = TrainConfig(time_minutes=3.0, **finetune)
    c.sft = TrainConfig(time_minutes=1.5, **finetune)
    c.midtrain_data.n_conversations = 30000
    # plain pretraining rows keep what the base model knew: without them finetuning erased it (facts 54% -> 89%,
    # post-finetune val bpb 1.70 -> 0.37 with 20%; docs/tiny.md)
    c.midtrain_data.text_fraction = 0.2
    c.sft_data.n_conversations = 12000
    c.sft_data.text_fraction = 0.1
    c.rl = RLConfig(time_minutes=3.0, prompts_per_step=8, samples_per_prompt=8, max_new_tokens=128)
    return c


def _depth_preset(depth: int) -> RunConfig:
    """GPU presets: everything follows from depth, nanochat-style (width = 64 * depth, 20 tokens/param)."""
    c = RunConfig(name=f"d{depth}", preset=f"d{depth}")
    c.model = ModelConfig(depth=depth, aspect_ratio=64, head_dim=128, vocab_size=32768, seq_len=2048, mlp_ratio=4.0)
    c.tokenizer = TokenizerConfig(vocab_size=32768, train_bytes=2_000_000_000)
    c.data.world_bytes = 200_000_000
    c.pretrain = TrainConfig(batch_tokens=524288, device_batch=32, tokens_per_param=20.0, dtype="auto",
                             compile=True, eval_every=250, eval_tokens=10 * 524288, checkpoint_every=1000)
    finetune = dict(batch_tokens=65536, device_batch=32, epochs=1.0, matrix_lr=0.01, embedding_lr=0.1,
                    unembedding_lr=0.002, warmup_frac=0.0, warmdown_frac=0.5, compile=True)
    c.midtrain = TrainConfig(**finetune)
    c.sft = TrainConfig(**finetune)
    c.midtrain_data.n_conversations = 400000
    c.midtrain_data.text_fraction = 0.2
    c.sft_data.n_conversations = 100000
    c.rl = RLConfig(steps=500, time_minutes=0, prompts_per_step=16, samples_per_prompt=16, max_new_tokens=256)
    return c


PRESETS = {
    "tiny": _tiny,
    "d12": lambda: _depth_preset(12),
    "d20": lambda: _depth_preset(20),
    "d26": lambda: _depth_preset(26),
}


def _coerce(value: str, current: Any, key: str) -> Any:
    """Parse a --set string into the type of the field it replaces."""
    try:
        if isinstance(current, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(float(value)) if "e" in value.lower() else int(value)
        if isinstance(current, float):
            return float(value)
        return value
    except ValueError:
        raise ExocortexError(f"--set {key}={value}: expected a {type(current).__name__}") from None


def apply_override(cfg: Any, key: str, value: str) -> None:
    parts = key.split(".")
    obj = cfg
    for i, p in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or p not in {f.name for f in dataclasses.fields(obj)}:
            valid = ", ".join(f.name for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else ""
            where = ".".join(parts[:i]) or "config"
            raise ExocortexError(f"unknown config key '{key}' ('{p}' is not in {where}; valid: {valid})")
        if i == len(parts) - 1:
            cur = getattr(obj, p)
            if dataclasses.is_dataclass(cur):
                raise ExocortexError(f"config key '{key}' is a section; set one of its fields, e.g. {key}.<field>=...")
            setattr(obj, p, _coerce(value, cur, key))
        else:
            obj = getattr(obj, p)


def make_config(preset: str = "tiny", overrides: list[str] | None = None, name: str | None = None) -> RunConfig:
    if preset not in PRESETS:
        raise ExocortexError(f"unknown preset '{preset}' (choose from: {', '.join(PRESETS)})")
    cfg = PRESETS[preset]()
    for ov in overrides or []:
        if "=" not in ov:
            raise ExocortexError(f"--set expects key=value, got '{ov}'")
        k, v = ov.split("=", 1)
        apply_override(cfg, k.strip(), v.strip())
    if name:
        cfg.name = name
    cfg.model.validate()
    cfg.data.validate()
    if cfg.tokenizer.vocab_size != cfg.model.vocab_size:
        cfg.model.vocab_size = cfg.tokenizer.vocab_size  # the tokenizer decides; keep them equal
    return cfg


def _from_dict(cls, d: dict):
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
            v = _from_dict(type(f.default_factory()), v)
        kwargs[f.name] = v
    return cls(**kwargs)


def save_config(cfg: RunConfig) -> Path:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.run_dir / "config.json"
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2))
    return path


def load_config(run_dir: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ExocortexError(f"{run_dir} is not a run directory (no config.json); run `exocortex tokenizer` or `exocortex speedrun` first")
    try:
        cfg = _from_dict(RunConfig, json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ExocortexError(f"{path} is not a valid config ({e})") from None
    cfg.runs_dir = str(Path(run_dir).parent)
    cfg.name = Path(run_dir).name
    for ov in overrides or []:
        if "=" not in ov:
            raise ExocortexError(f"--set expects key=value, got '{ov}'")
        k, v = ov.split("=", 1)
        apply_override(cfg, k.strip(), v.strip())
    return cfg


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def lr_dim_scale(width: int) -> float:
    """AdamW learning rates for embeddings scale as 1/sqrt(width), tuned at width 768 (as in nanochat)."""
    return (width / 768) ** -0.5


def budget_steps(train: TrainConfig, n_params: int) -> int | None:
    """Steps from a tokens-per-parameter ratio (Chinchilla-style); None when another budget applies."""
    if train.max_steps:
        return train.max_steps
    if train.tokens_per_param > 0:
        return max(1, math.ceil(train.tokens_per_param * n_params / train.batch_tokens))
    return None
