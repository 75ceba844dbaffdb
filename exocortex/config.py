"""One config system for every stage: dataclasses, presets, and `--set key=value` overrides.

A run directory keeps the resolved config (config.json), so any stage can be re-run alone and reads
exactly what the earlier stages used. Every value is checked in one place (`validate`), whether it comes
from a preset, `--set` or config.json: choices are `Literal` types, mixtures are dicts, and an unknown key
or a value of the wrong type is an error, never silently dropped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

from exocortex.errors import ExocortexError
from exocortex.fileio import atomic_write_text, read_json_object
from exocortex.run import RunDir


# ----------------------------------------------------------------------------- what each field allows

@dataclass(frozen=True)
class Range:
    """A number field's allowed values, both ends included. Every number has both ends: a huge value is a
    typo to report, not a run that allocates for hours and then dies."""
    lo: float
    hi: float

    def check(self, key: str, value: float) -> None:
        if not self.lo <= value <= self.hi:  # NaN fails every comparison, so it lands here too
            raise ExocortexError(f"{key}={value!r}: must be between {_show(self.lo)} and {_show(self.hi)}")


def _show(x: float) -> str:
    return str(int(x)) if x == int(x) else f"{x:g}"


@dataclass(frozen=True)
class Match:
    """A string field's allowed values: a regular expression that must match all of it."""
    pattern: str
    allowed: str  # the pattern in words, for the error

    def check(self, key: str, value: str) -> None:
        if not re.fullmatch(self.pattern, value):
            raise ExocortexError(f"{key}={value!r}: expected {self.allowed}")


@dataclass(frozen=True)
class ExistingPath:
    """A path field: when set on the command line it must exist (empty = unset). Only then: a run whose corpus
    was moved later must still load for chat and eval, which never read it."""
    on_command_line_only = True

    def check(self, key: str, value: str) -> None:
        if value and not os.path.exists(os.path.expanduser(value)):  # False (no exception) for a name too long
            raise ExocortexError(f"{key}={value!r}: no such file or directory")


BIG = 10**9                                    # counts of steps, items, conversations
SEED = Annotated[int, Range(0, 2**32 - 1)]     # numpy's generators take no negative seeds
STEPS = Annotated[int, Range(0, BIG)]          # 0 = off / derived from another setting
EVERY = Annotated[int, Range(1, BIG)]
LR = Annotated[float, Range(0, 10)]
FRACTION = Annotated[float, Range(0, 1)]
MINUTES = Annotated[float, Range(0, 10**6)]
BYTES = Annotated[int, Range(1, 2**50)]
NEW_TOKENS = Annotated[int, Range(1, 2**20)]
# 256 single bytes + the chat format's special tokens (tokenizer.SPECIAL_TOKENS, which sits above this module;
# tests/test_config.py checks the two agree)
MIN_VOCAB = 256 + 11


@dataclass
class ModelConfig:
    # Architecture is exactly HF transformers' Qwen3ForCausalLM (see docs/architecture.md), so exports are lossless.
    depth: Annotated[int, Range(1, 1024)] = 4               # number of transformer blocks: the one knob the GPU presets turn
    width: Annotated[int, Range(0, 2**16)] = 0               # model dim; 0 = depth * aspect_ratio
    aspect_ratio: Annotated[int, Range(1, 1024)] = 64       # width per layer, as nanochat sizes its models
    head_dim: Annotated[int, Range(2, 1024)] = 64
    n_kv_heads: Annotated[int, Range(0, 2**12)] = 0          # 0 = same as query heads (no grouping); set smaller for GQA
    mlp_ratio: Annotated[float, Range(0.1, 64)] = 3.0       # SwiGLU hidden = round(mlp_ratio * width)
    vocab_size: Annotated[int, Range(MIN_VOCAB, 2**24)] = 8192  # not a setting: always the tokenizer's (tokenizer.vocab_size)
    seq_len: Annotated[int, Range(2, 2**20)] = 512
    rope_theta: Annotated[float, Range(1, 1e12)] = 10000.0
    norm_eps: Annotated[float, Range(1e-12, 1)] = 1e-6
    # start with a copying circuit wired in (GPT.wire_copying): at the tiny preset's 300 steps none forms on its own
    induction_init: bool = False

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
        """What no single field's range can say: how the fields fit together."""
        if self.n_embd % self.head_dim:
            raise ExocortexError(f"model width {self.n_embd} is not a multiple of head_dim {self.head_dim}")
        if self.n_heads % self.kv_heads:
            raise ExocortexError(f"n_kv_heads={self.kv_heads} must divide the number of heads {self.n_heads}")
        if self.head_dim % 2:
            raise ExocortexError("head_dim must be even for rotary embeddings")
        if self.induction_init and (self.depth < 2 or self.kv_heads < 2 or self.head_dim < 16
                                    or self.n_embd < 2 * self.head_dim):
            raise ExocortexError("model.induction_init needs depth >= 2, 2 or more key/value heads, head_dim >= 16 "
                                 "and width >= 2 * head_dim; set model.induction_init=false for this shape")


@dataclass
class DataConfig:
    path: Annotated[str, ExistingPath()] = ""  # user's text (file or directory of .txt/.md/.jsonl/.parquet); empty = generated world
    world_seed: SEED = 0
    world_bytes: BYTES = 24_000_000  # how much world text to generate
    val_fraction: Annotated[float, Range(1e-6, 0.5)] = 0.01
    # pretraining rows: bestfit (each starts at a document, no padding) | stream (cut from the token stream)
    packing: Literal["bestfit", "stream"] = "bestfit"
    workers: Annotated[int, Range(0, 4096)] = 0             # tokenizer processes; 0 = one per available CPU core


@dataclass
class TokenizerConfig:
    vocab_size: Annotated[int, Range(MIN_VOCAB, 2**24)] = 8192  # including special tokens
    train_bytes: BYTES = 20_000_000  # train the BPE on at most this much text


@dataclass
class TrainConfig:
    """Shared by every training stage (pretrain, sft): they differ only in data and loss mask."""
    batch_tokens: Annotated[int, Range(1, 2**34)] = 16384    # tokens per optimizer step (gradient accumulation reaches it)
    device_batch: Annotated[int, Range(1, 2**16)] = 16       # rows per forward pass
    tokens_per_param: Annotated[float, Range(0, 10**6)] = 0.0  # token budget = ratio * params; 0 = use max_steps / time_minutes
    max_steps: STEPS = 0           # 0 = derived from tokens_per_param or epochs
    time_minutes: MINUTES = 0.0    # alternative budget: choose steps to fit this many minutes (measured)
    epochs: Annotated[float, Range(0, 10**4)] = 1.0          # for finetuning stages: passes over the conversation set
    matrix_lr: LR = 0.02      # Muon, for 2-D weights inside the blocks
    embedding_lr: LR = 0.2    # AdamW, token embeddings (scaled by (width/768)^-0.5)
    unembedding_lr: LR = 0.004  # AdamW, lm_head (scaled likewise)
    scalar_lr: LR = 0.02      # AdamW, norm gains
    weight_decay: LR = 0.0
    warmup_frac: FRACTION = 0.02
    warmdown_frac: FRACTION = 0.3
    final_lr_frac: FRACTION = 0.0
    eval_every: EVERY = 100
    eval_tokens: Annotated[int, Range(1, 2**40)] = 65536
    checkpoint_every: STEPS = 200
    keep_checkpoints: STEPS = 2
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 where the hardware computes it natively
    compile: bool = False
    grad_clip: Annotated[float, Range(0, 10**6)] = 1.0
    parallel: Literal["ddp", "fsdp"] = "ddp"  # ddp: replicated weights; fsdp: weights, grads, optimizer state sharded


# functions (calling the tools a client offers) takes 6% of midtrain and 7% of sft, from the other tasks in
# proportion to their weights (each keeps ~93% of its share, rounded to 0.01; their balance, which was measured,
# stays). Modest, because its conversations are long: the tools block makes them ~2.5x an average one's tokens,
# so 6% of conversations is ~15% of midtrain's tokens, and the steps are what the time budget buys.
# memory (remember / recall / forget, issue #15) takes 5% of both, from smalltalk and identity in midtrain and from
# smalltalk, functions and facts_mc in sft
MIDTRAIN_MIXTURE = {"arithmetic": 0.11, "word_problems": 0.15, "spelling": 0.11, "facts": 0.15, "facts_mc": 0.1,
                    "lookup": 0.15, "smalltalk": 0.06, "identity": 0.06, "functions": 0.06, "memory": 0.05}
# facts_mc is in sft too: its recall-then-check replies are a habit that sft wears off (issue #14; one fixed-step
# run: 49% at a weight of 0.05, 58% at 0.10, and copy_em 6% against 15%: the checks keep the induction head in
# use); smalltalk gave identity back the 2% it had lent facts_mc (identity read 80-85% at 4%, 100% at 6%).
# Weights, drawn in proportion (they sum to 1.05).
SFT_MIXTURE = {"word_problems": 0.28, "lookup": 0.15, "arithmetic": 0.11, "facts": 0.11, "spelling": 0.09,
               "smalltalk": 0.04, "identity": 0.06, "functions": 0.06, "facts_mc": 0.10, "memory": 0.05}


@dataclass
class SFTDataConfig:
    """Conversations for a finetuning stage (midtrain or sft): a weighted task mixture (see exocortex/tasks)."""
    # task name (or benchmark file, kind:path) -> weight; on the command line "name=weight,name=weight"
    mixture: dict[str, float] = field(default_factory=lambda: dict(SFT_MIXTURE))
    n_conversations: Annotated[int, Range(1, BIG)] = 12000
    text_fraction: Annotated[float, Range(0, 0.99)] = 0.0   # share of rows that are plain pretraining text: keeps what the base model knew
    seed: SEED = 1


@dataclass
class RLConfig:
    """GRPO-style RL on a task's grader: a group of samples per prompt, group-normalised advantages."""
    task: str = "word_problems"
    steps: STEPS = 0             # 0 = use time_minutes
    time_minutes: MINUTES = 3.0
    prompts_per_step: Annotated[int, Range(1, 2**16)] = 8
    samples_per_prompt: Annotated[int, Range(1, 2**16)] = 8  # the group
    device_batch: Annotated[int, Range(1, 2**16)] = 16  # rollout rows per forward/backward of the update (memory grows with it; docs/tiny.md)
    max_new_tokens: NEW_TOKENS = 128
    temperature: Annotated[float, Range(0.01, 100)] = 1.0
    top_k: Annotated[int, Range(0, 2**24)] = 0               # 0 = full distribution
    lr_scale: Annotated[float, Range(0, 100)] = 0.1        # learning rates relative to the sft stage's (Muon's updates have a fixed size: keep RL's small)
    kl_coef: Annotated[float, Range(0, 100)] = 0.0         # per-token KL penalty to the sft model (0 = off, as DAPO/nanochat)
    eval_every: EVERY = 20
    eval_n: STEPS = 100            # held-out prompts for the periodic eval
    checkpoint_every: STEPS = 10
    guard: bool = True           # stop and keep the last good checkpoint when rewards rise while samples degenerate
    # the compiled decode step for rollouts and the held-out eval (infer/engine.py decode_compile): auto = on a CPU
    # where it can be built, when the stage's sampling is big enough to repay building it; "on" on CUDA replays
    # CUDA graphs with weights rebuilt after every update, which has not been measured
    compile: Literal["auto", "on", "off"] = "auto"
    seed: SEED = 7


@dataclass
class EvalConfig:
    # held-out questions per chat task (name=count); lookup is also scored with its tool switched off
    chat_tasks: dict[str, int] = field(default_factory=lambda: {
        "arithmetic": 100, "word_problems": 200, "spelling": 100, "facts": 100, "facts_mc": 100, "lookup": 100,
        "identity": 20, "functions": 100, "memory": 40})
    # questions per task asked in its held-out phrasing families (exocortex/tasks/phrasing.py): -1 = as many as
    # chat_tasks gives the task, 0 = none (no `<task>_heldout_accuracy`)
    heldout_n: Annotated[int, Range(-1, 2**20)] = -1
    pass_k: Annotated[int, Range(1, 1024)] = 4              # pass@k on word problems: k samples at temperature 1 per question
    pass_k_n: STEPS = 50
    core_n: STEPS = 100            # in-context items per base-eval (CORE-style) task
    core_bundle: Annotated[str, ExistingPath()] = ""  # path to a DCLM CORE eval bundle (core.yaml + eval_data/) to add its tasks
    max_new_tokens: NEW_TOKENS = 128
    compile: Literal["auto", "on", "off"] = "auto"  # the compiled decode step for the replies (as rl.compile)
    seed: SEED = 12345


@dataclass
class LoggingConfig:
    """Metrics beside logs/<stage>.jsonl (rank 0 only); both are optional packages."""
    tensorboard: Literal["auto", "on", "off"] = "auto"  # auto: on when `tensorboard` is installed; runs/<name>/tensorboard/
    wandb_project: str = ""      # Weights & Biases project (or set WANDB_PROJECT); needs `pip install wandb`
    wandb_run: str = ""          # run name shown in wandb; default: the run's name


@dataclass
class SamplingConfig:
    """Defaults for chat and serve when the user or the request does not say."""
    temperature: Annotated[float, Range(0, 100)] = 0.6
    top_k: Annotated[int, Range(0, 2**24)] = 50              # 0 = off
    top_p: Annotated[float, Range(0, 1)] = 0.95
    max_tokens: NEW_TOKENS = 256


@dataclass
class RunConfig:
    name: Annotated[str, Match(r"[^/\\\x00]+", "a directory name (no slashes)")] = "tiny"
    runs_dir: str = "runs"
    preset: str = "tiny"
    seed: SEED = 42
    # auto: cuda, mps, else cpu
    device: Annotated[str, Match(r"auto|cpu|mps|cuda(:\d{1,3})?", "auto, cpu, mps, cuda or cuda:N")] = "auto"
    # what the chat model calls itself: taught in midtrain/sft, graded in eval/rl
    identity_name: Annotated[str, Match(r"\S[^\n\r]{0,63}", "one line of 1 to 64 characters")] = "exocortex"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    midtrain: TrainConfig = field(default_factory=TrainConfig)
    midtrain_data: SFTDataConfig = field(default_factory=lambda: SFTDataConfig(mixture=dict(MIDTRAIN_MIXTURE)))
    sft: TrainConfig = field(default_factory=TrainConfig)
    sft_data: SFTDataConfig = field(default_factory=SFTDataConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- presets

def _tiny() -> RunConfig:
    """Fits a 2-core CPU: the whole speedrun in ~18-20 minutes. Shape chosen by measurement (docs/tiny.md)."""
    c = RunConfig(name="tiny", preset="tiny")
    c.model = ModelConfig(depth=4, width=256, head_dim=64, vocab_size=4096, seq_len=256, mlp_ratio=3.0,
                          induction_init=True)
    c.tokenizer.vocab_size = 4096
    c.tokenizer.train_bytes = 8_000_000
    c.data.world_bytes = 20_000_000
    c.pretrain = TrainConfig(batch_tokens=8192, device_batch=32, time_minutes=5.5, eval_every=100,
                             eval_tokens=32768, checkpoint_every=200, warmdown_frac=0.4, compile=True)
    finetune = dict(batch_tokens=8192, device_batch=32, matrix_lr=0.01, embedding_lr=0.1, unembedding_lr=0.002,
                    scalar_lr=0.01, warmup_frac=0.0, warmdown_frac=0.5, eval_every=50, eval_tokens=16384,
                    checkpoint_every=400, compile=True)
    # facts_mc after midtrain follows its steps (speedruns: 191 steps 42%, 216 46%, 258 63%, 281 64%, 314 66%); the
    # minute comes from RL, whose steps got ~45% faster (2 minutes now hold the steps 3 did; docs/tiny.md)
    c.midtrain = TrainConfig(time_minutes=4.0, **finetune)
    c.sft = TrainConfig(time_minutes=1.5, **finetune)
    c.midtrain_data.n_conversations = 30000
    # plain pretraining rows keep what the base model knew: without them finetuning erased it (facts 54% -> 89%,
    # post-finetune val bpb 1.70 -> 0.37 with 20%; docs/tiny.md)
    c.midtrain_data.text_fraction = 0.2
    c.sft_data.n_conversations = 12000
    # sft wore off what midtrain recalled (facts_mc 64% -> 57% in a speedrun); at 0.2 instead of 0.1, fixed steps
    # from one midtrain checkpoint, 300 questions: facts_mc 62.0% -> 67.0%, facts 77.7% -> 80.3%, spelling
    # 70% -> 63.5% (docs/tiny.md)
    c.sft_data.text_fraction = 0.2
    c.rl = RLConfig(time_minutes=2.0, prompts_per_step=8, samples_per_prompt=8, max_new_tokens=128)
    # room for the longest reference solutions: a JSON tool call costs ~20 tokens here (was ~7 as `calculator(...)`),
    # and 2% of the word problems' solutions now run past 128 (docs/tiny.md)
    c.eval.max_new_tokens = 160
    # arithmetic's seen-vs-held-out gap is the number issue #14 watches: at 100 questions a side its standard
    # error is ~5 points; 400 a side (~2.6) cost a few seconds of decoding (one short call each)
    c.eval.chat_tasks = {**c.eval.chat_tasks, "arithmetic": 400}
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


# ----------------------------------------------------------------------------- values: parsed and checked

_KIND = {int: "a whole number", float: "a number"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
DERIVED = {"model.vocab_size": "tokenizer.vocab_size"}  # keys that follow another setting: set that one instead
FROM_FLAGS = {"name": "--run", "runs_dir": "--runs-dir", "preset": "--preset"}  # where a run is: flags, not --set
MOVED = {"sft_data.identity_name": "identity_name", "midtrain_data.identity_name": "identity_name"}  # older runs


def parse_mixture(spec: str) -> dict[str, float]:
    """'a=0.5,b=0.5' -> {'a': 0.5, 'b': 0.5}; a bare name gets weight 1."""
    out: dict[str, float] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, w = item.rpartition("=") if "=" in item else (item, "", "1")
        try:
            out[name.strip()] = float(w)
        except ValueError:
            raise ExocortexError(f"mixture item '{item}': weight must be a number (name=weight)") from None
    return out


def _convert(value: Any, hint: Any, key: str, text: bool = False) -> Any:
    """`value` as the field's type, or a one-line error. text=True: a --set string, parsed; else a Python or
    JSON value, which must already have the field's type (an int may stand for a float)."""
    if get_origin(hint) is Annotated:  # a type plus what it allows: convert, then check the value
        kind, *rules = get_args(hint)
        value = _convert(value, kind, key, text)
        for rule in rules:
            if text or not getattr(rule, "on_command_line_only", False):
                rule.check(key, value)
        return value
    origin = get_origin(hint)

    def bad(expected: str):
        return ExocortexError(f"{key}={value!r}: expected {expected}")

    if origin is Literal:
        if value not in get_args(hint):
            raise bad("one of " + ", ".join(map(str, get_args(hint))))
        return value
    if origin is dict:
        kind = get_args(hint)[1]
        try:
            # the string form also reads config.json files written before mixtures were dicts
            mixture = parse_mixture(value) if isinstance(value, str) else value
        except ExocortexError as e:
            raise ExocortexError(f"{key}={value!r}: {e}") from None
        if not isinstance(mixture, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    for v in mixture.values()):
            raise bad("name=number pairs, e.g. 'a=0.5,b=0.5'")
        if kind is int and not all(float(v).is_integer() for v in mixture.values()):
            raise bad("name=count pairs with whole counts, e.g. 'a=5,b=10'")
        if not mixture or not all(0 <= v <= BIG for v in mixture.values()) or sum(mixture.values()) <= 0:
            raise bad(f"at least one name with a positive number, each between 0 and {BIG:g}")
        return {str(k): kind(v) for k, v in mixture.items()}
    if hint is bool:
        if text and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint in (int, float):
        try:
            number = (float(value) if "e" in value.lower() else hint(value)) if text else value
        except ValueError:
            raise bad(_KIND[hint]) from None
        whole = isinstance(number, int) or (isinstance(number, float) and number.is_integer())  # False for NaN, inf
        if isinstance(number, bool) or not isinstance(number, (int, float)) or (hint is int and not whole):
            raise bad(_KIND[hint])
        return hint(number)
    if hint is str and not isinstance(value, str):
        raise bad("a string")
    return value


def _field_hints(obj_or_class) -> dict[str, Any]:
    """Field -> type, with its Range or Match kept (include_extras)."""
    cls = obj_or_class if isinstance(obj_or_class, type) else type(obj_or_class)
    return get_type_hints(cls, include_extras=True)


def config_fields(cfg: "RunConfig | None" = None):
    """(dotted key, type hint with its Range or Match) for every field: the top-level ones and each section's."""
    cfg = cfg or RunConfig()
    top = _field_hints(RunConfig)
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(obj):
            yield section.name, top[section.name]
            continue
        hints = _field_hints(obj)
        for f in dataclasses.fields(obj):
            yield f"{section.name}.{f.name}", hints[f.name]


def apply_override(cfg: RunConfig, key: str, value: str) -> None:
    """--set section.field=value (or field=value for a top-level field)."""
    if key in DERIVED:
        raise ExocortexError(f"{key} follows {DERIVED[key]}; set that instead (--set {DERIVED[key]}={value})")
    if key in FROM_FLAGS:  # on an existing run --set name=x would write the next stage's files into another run
        raise ExocortexError(f"{key} comes from the command line: use {FROM_FLAGS[key]} {value}")
    if key in MOVED:
        print(f"note: {key} is now {MOVED[key]}; setting that")
        key = MOVED[key]
    parts, obj = key.split("."), cfg
    for i, p in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
        if p not in names:
            where = ".".join(parts[:i]) or "config"
            raise ExocortexError(f"unknown config key '{key}' ('{p}' is not in {where}; valid: {', '.join(names)})")
        if i < len(parts) - 1:
            obj = getattr(obj, p)
        elif dataclasses.is_dataclass(getattr(obj, p)):
            raise ExocortexError(f"config key '{key}' is a section; set one of its fields, e.g. {key}.<field>=...")
        else:
            setattr(obj, p, _convert(value, _field_hints(obj)[p], key, text=True))


# what says how long each training stage trains: at least one must be set
BUDGETS = {"pretrain": ("max_steps", "tokens_per_param", "time_minutes"),
           "midtrain": ("max_steps", "time_minutes", "epochs"), "sft": ("max_steps", "time_minutes", "epochs"),
           "rl": ("steps", "time_minutes")}


def check_budget(cfg: RunConfig, stage: str) -> None:
    """A training stage checks its own budget when it starts, before it writes anything; not `validate`, so
    a run with another stage unbudgeted still loads for chat, serve, eval and export. No-op for a stage
    without a budget (tokenizer, eval)."""
    keys = BUDGETS.get(stage, ())
    if keys and not any(getattr(getattr(cfg, stage), k) for k in keys):
        raise ExocortexError(f"{stage} has no budget: set one of " + ", ".join(f"{stage}.{k}" for k in keys))


def check_flag(flag: str, key: str, value: Any) -> Any:
    """A command-line flag that stands for a config field (chat's --temperature for sampling.temperature):
    the field's type and range, the error naming the flag."""
    section, name = key.split(".")
    owner = type(getattr(RunConfig(), section))
    return _convert(value, _field_hints(owner)[name], flag)


def validate(cfg: RunConfig) -> RunConfig:
    """Every check of a config's values, whatever their source: each field's type and range (the Range and
    Match beside it), then how the fields fit together."""
    top = _field_hints(RunConfig)
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(obj):
            setattr(cfg, section.name, _convert(obj, top[section.name], section.name))
        else:
            hints = _field_hints(obj)
            for f in dataclasses.fields(obj):  # presets and code can set values too: same checks as --set
                setattr(obj, f.name, _convert(getattr(obj, f.name), hints[f.name], f"{section.name}.{f.name}"))
            try:
                getattr(obj, "validate", lambda: None)()
            except ExocortexError as e:
                raise ExocortexError(f"{section.name}.{e}" if str(e).split("=")[0].isidentifier() else str(e)) from None
    return cfg


def _overrides(cfg: RunConfig, overrides: list[str] | None) -> None:
    for ov in overrides or []:
        if "=" not in ov:
            raise ExocortexError(f"--set expects key=value, got '{ov}'")
        k, v = ov.split("=", 1)
        apply_override(cfg, k.strip(), v.strip())


def make_config(preset: str = "tiny", overrides: list[str] | None = None, name: str | None = None) -> RunConfig:
    if preset not in PRESETS:
        raise ExocortexError(f"unknown preset '{preset}' (choose from: {', '.join(PRESETS)})")
    cfg = PRESETS[preset]()
    _overrides(cfg, overrides)
    if name:
        cfg.name = name
    cfg.model.vocab_size = cfg.tokenizer.vocab_size  # the tokenizer decides (pretrain sets the trained size)
    return validate(cfg)


def _from_dict(cls, d: Any, where: str = ""):
    """A dataclass from config.json's dict: unknown keys and wrongly typed values are errors."""
    if not isinstance(d, dict):
        raise ExocortexError(f"{where or 'the config'} must be a JSON object, not {type(d).__name__}")
    hints, fields = _field_hints(cls), {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise ExocortexError(f"unknown key '{(where + '.' if where else '') + unknown[0]}' (valid: {', '.join(fields)})")
    kwargs = {}
    for k, v in d.items():
        key = f"{where}.{k}" if where else k
        default = fields[k].default_factory() if fields[k].default_factory is not dataclasses.MISSING else None
        kwargs[k] = _from_dict(type(default), v, key) if dataclasses.is_dataclass(default) else _convert(v, hints[k], key)
    return cls(**kwargs)


def section_from_dict(cls, d: Any, where: str):
    """One section read from a file (a checkpoint's model_config): the same checks as config.json's."""
    section = _from_dict(cls, d, where)
    getattr(section, "validate", lambda: None)()
    return section


def _migrate(d: dict) -> dict:
    """Keys that moved since a run was made go to their new place (the newer place wins)."""
    for old, new in MOVED.items():
        section, key = old.split(".")
        if isinstance(d.get(section), dict) and key in d[section]:
            value = d[section].pop(key)
            d.setdefault(new, value)
    return d


def save_config(cfg: RunConfig) -> Path:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.run_dir / "config.json"
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2))
    return path


def load_config(run_dir: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """A run's saved config plus overrides, checked before anything runs (nothing is written here)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise ExocortexError(f"{run_dir} is not a run directory (no config.json); run `exocortex tokenizer` or "
                             "`exocortex speedrun` first")
    raw = read_json_object(path, f"restore it, or start the run over with `exocortex speedrun --run "
                                 f"{Path(run_dir).name} --force`")
    try:
        cfg = _from_dict(RunConfig, _migrate(raw))
    except ExocortexError as e:
        raise ExocortexError(f"{path}: {e}") from None
    cfg.runs_dir = str(Path(run_dir).parent)
    cfg.name = Path(run_dir).name
    _overrides(cfg, overrides)
    return validate(cfg)


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
