"""Every command of the pipeline in one table: the CLI, `speedrun`, eval, the report and the chat apps read it.

A stage is one file under exocortex/stages/ (an app one under exocortex/apps/) with a run function, plus one
entry here. The table is plain data and imports nothing of ours, so any layer may read stage names, labels and
parents; the run functions are named by import path and loaded only when the CLI runs them, which keeps the
library from ever importing a stage (tests/test_layers.py checks both, and that every path resolves).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Literal


@dataclass(frozen=True)
class Stage:
    name: str
    run: str                         # "module:function"; called as function(cfg, **options)
    help: str
    config: Literal["new", "existing", "recent"] = "existing"  # new: a run from --preset; recent: default to the newest run
    options: tuple[str, ...] = ()    # CLI options beyond --run/--preset/--set (defined in cli.OPTIONS)
    parents: tuple[str, ...] = ()    # checkpoints it starts from: the first of these the run has
    label: str = ""                  # the report's column for the model this stage writes ("" = writes none)
    chat: bool = False               # its model talks (chat, serve and export default to the newest such)
    speedrun: bool = False           # a step of `exocortex speedrun`, in table order

    def load(self) -> Callable:
        module, function = self.run.split(":")
        return getattr(importlib.import_module(module), function)


STAGES: tuple[Stage, ...] = (
    Stage("tokenizer", "exocortex.stages.tokenizer:run_tokenizer", "train the BPE tokenizer on the corpus and tokenize it",
          config="new", options=("data", "force"), speedrun=True),
    Stage("pretrain", "exocortex.stages.pretrain:run_pretrain", "pretrain the base model",
          options=("data", "resume", "force"), label="BASE", speedrun=True),
    Stage("midtrain", "exocortex.stages.finetune:run_midtrain",
          "teach the chat format, tools, multiple choice and spelling on a broad task mixture",
          options=("resume", "force"), parents=("pretrain",), label="MID", chat=True, speedrun=True),
    Stage("sft", "exocortex.stages.finetune:run_sft", "supervised finetuning on a targeted task mixture",
          options=("resume", "force"), parents=("midtrain", "pretrain"), label="SFT", chat=True, speedrun=True),
    Stage("rl", "exocortex.stages.rl:run_rl",
          "reinforcement learning (GRPO) on a task's verifiable rewards, with a reward-hacking guard",
          options=("resume", "force"), parents=("sft", "midtrain", "pretrain"), label="RL", chat=True, speedrun=True),
    Stage("eval", "exocortex.stages.evaluate:run_eval",
          "every stage: bits-per-byte, in-context (CORE-style) and held-out chat task accuracy",
          options=("stages", "sandbox"), speedrun=True),
    Stage("report", "exocortex.stages.report:run_report", "write runs/<name>/report.md", speedrun=True),
    Stage("speedrun", "exocortex.stages.speedrun:run_speedrun",
          "every stage in order (tiny preset: ~15 min on a CPU)", config="new", options=("data", "resume", "force", "sandbox")),
    Stage("chat", "exocortex.apps.chat:run_chat", "talk to your model", config="recent",
          options=("chat_checkpoint", "prompt", "sampling", "system", "seed", "docs", "index", "memory", "user", "compile", "sandbox")),
    Stage("serve", "exocortex.apps.serve:serve",
          "serve the chat model: OpenAI-compatible API (/v1) and a web chat page (/)", config="recent",
          options=("chat_checkpoint", "host", "port", "max_concurrent", "max_queue", "compile", "max_prompt_tokens", "docs", "index", "memory", "sandbox",
                   "api_key", "allowed_hosts", "escalate")),
    Stage("export", "exocortex.apps.export:run_export", "write a Hugging Face transformers (Qwen3) directory, or a "
          "GGUF file for llama.cpp / Ollama (--format gguf): weights, tokenizer, chat template",
          options=("format", "out", "checkpoint", "dtype", "verify")),
)

BY_NAME = {s.name: s for s in STAGES}
MODEL_STAGES = tuple(s.name for s in STAGES if s.label)       # pretrain, midtrain, sft, rl: they write checkpoints
CHAT_STAGES = tuple(s.name for s in reversed(STAGES) if s.chat)  # newest first: rl, sft, midtrain
LABELS = {s.name: s.label for s in STAGES if s.label}
