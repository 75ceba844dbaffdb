"""Stage `rl`: reinforcement learning on verifiable rewards, GRPO-style, through the one training loop.

Each step samples a group of completions per training prompt with the current policy (tools on), scores them
with the task's grader, and turns rewards into group-normalised advantages A = (r - mean) / (std + eps).
The train loop then minimises sum(w * token cross-entropy) with w = A / (sampled tokens in the batch):
a token-level-normalised policy gradient (on-policy, one update per batch, so no ratio clipping is needed).
Tool outputs and prompts get weight 0: the model is only credited for what it wrote. An optional per-token
KL penalty to the starting model folds into the weights.

A guard watches for reward hacking: if the reward rises while samples degenerate (repeated n-grams,
collapsing entropy), the run stops and the stage keeps its last checkpoint from before.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import deque

import torch

from exocortex.checkpoint import load_model
from exocortex.config import RLConfig, RunConfig, TrainConfig, check_budget, save_config
from exocortex.device import release_freed_memory, resolve_device, resolve_dtype
from exocortex.evals import task_accuracy
from exocortex.infer.decode import warm_up_note
from exocortex.infer.engine import Engine, decode_compile
from exocortex.infer.lookup import tools_for_run
from exocortex.run import RLSummary, RunDir
from exocortex.tasks import task_set
from exocortex.tasks.base import prompt_ids
from exocortex.tokenizer import Tokenizer
from exocortex.train import parallel as dist
from exocortex.train.loop import train
from exocortex.train.metrics import MetricsSink


def repeated_ngram_rate(tokens: list[int], n: int = 3) -> float:
    """Share of a sample's n-grams that already occurred earlier in the same sample (0 fresh .. 1 looping)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


class RolloutSource:
    """A BatchSource whose micro-batches are sampled on the fly by the current policy. Deterministic in (weights,
    index): prompts and sampling seeds derive from the step's rollout number, so an interrupted run resumes exactly.

    A step's rollout (prompts x samples rows) is trained on in `chunks` micro-batches of `rows` rows: the
    training forward/backward over all of them at once held every row's logits and activations together
    (1.7 GB of the tiny RL's 5 GB; docs/tiny.md). A rollout is sampled once, at its first chunk, and kept
    until the next one."""

    def __init__(self, engine: Engine, task, r: RLConfig, ref_model=None, chunks: int = 1):
        self.engine, self.task, self.r, self.ref = engine, task, r, ref_model
        per_step = r.prompts_per_step * r.samples_per_prompt
        if chunks < 1 or per_step % chunks:
            raise ValueError(f"{per_step} rollout rows do not split into {chunks} micro-batches")
        self.chunks, self.rows = chunks, per_step // chunks
        self.last_stats: dict = {}
        self._rollout_number, self._rollout = None, None

    def _sample(self, prompts: list[list[int]], seed: int, stats: dict):
        """G samples of every prompt in one batch (rows prompt-major): token ids and whether each token was
        forced (tool output)."""
        n = len(prompts) * self.r.samples_per_prompt
        toks, forced = [[] for _ in range(n)], [[] for _ in range(n)]
        done = [False] * n
        for column, mask in self.engine.generate(prompts, num_samples=self.r.samples_per_prompt,
                                                 max_tokens=self.r.max_new_tokens, temperature=self.r.temperature,
                                                 top_k=self.r.top_k or None, seed=seed, stats=stats):
            for g, (t, f) in enumerate(zip(column, mask)):
                if done[g]:
                    continue
                toks[g].append(t)
                forced[g].append(f)
                done[g] = t in self.engine.stop_ids and not f
        return toks, forced

    def _rollout_rows(self, number: int) -> tuple[list, int]:
        """Rollout `number`: rows of (tokens, trained-on mask, advantage) and the count of sampled tokens;
        sets last_stats."""
        r, tok, eng = self.r, self.engine.tok, self.engine
        G = r.samples_per_prompt
        rng = random.Random(f"rl-{r.seed}-{number}")
        examples = [self.task.example(rng, "train") for _ in range(r.prompts_per_step)]
        prompts = [prompt_ids(tok, ex) for ex in examples]
        stats: dict = {}
        all_toks, all_forced = self._sample(prompts, seed=r.seed * 1_000_003 + number, stats=stats)
        rows, rewards_all, lengths, reps = [], [], [], []
        for p, (ex, prompt) in enumerate(zip(examples, prompts)):
            toks, forced = all_toks[p * G:(p + 1) * G], all_forced[p * G:(p + 1) * G]
            rewards = [self.task.reward_reply(eng.to_parts([t for t in s if t not in eng.stop_ids]), ex) for s in toks]
            mean = sum(rewards) / len(rewards)
            std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / len(rewards))
            for s, f, rew in zip(toks, forced, rewards):
                mask = [0] * (len(prompt) - 1) + [0 if ff else 1 for ff in f]
                rows.append((prompt + s, mask, (rew - mean) / (std + 1e-4)))
                own = [t for t, ff in zip(s, f) if not ff]
                lengths.append(len(own))
                reps.append(repeated_ngram_rate(own))
            rewards_all += rewards
        seq_len = eng.model.cfg.seq_len
        n_tokens = max(1, sum(sum(m[:seq_len]) for _, m, _ in rows))
        self.last_stats = {
            "reward": sum(rewards_all) / len(rewards_all),
            "entropy": stats.get("entropy_sum", 0.0) / max(1, stats.get("sampled", 0)),
            "length": sum(lengths) / len(lengths),
            "repeat_3gram": sum(reps) / len(reps),
        }
        # micro-batches of like lengths: each is padded to its longest row (tiny word problems: 27% of the
        # update's tokens were padding in prompt-major order, 12% sorted). The loss sums over tokens, so the
        # order does not change the update.
        rows.sort(key=lambda row: len(row[0]))
        return rows, n_tokens

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # the loop numbers micro-batches (step * chunks + micro) * world + rank; one rollout per step and rank
        world = dist.world_size()
        number = (index // world) // self.chunks * world + index % world
        micro = (index // world) % self.chunks
        # the last micro-batch's buffers go back to the OS: the next one's length differs (see the function)
        release_freed_memory()
        if number != self._rollout_number:
            self._rollout_number, self._rollout = number, None  # the old rows go before the new are sampled
            self._rollout = self._rollout_rows(number)
        rows, n_tokens = self._rollout
        chunk = rows[micro * self.rows:(micro + 1) * self.rows]
        T = min(max(len(s) for s, _, _ in chunk) - 1, self.engine.model.cfg.seq_len)
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.full((len(chunk), T), -1, dtype=torch.long)
        w = torch.zeros(len(chunk), T)
        for i, (s, m, a) in enumerate(chunk):
            s, m = s[:T + 1], m[:T]
            x[i, :len(s) - 1] = torch.tensor(s[:-1])
            mt = torch.tensor(m, dtype=torch.bool)
            y[i, :len(s) - 1] = torch.where(mt, torch.tensor(s[1:]), torch.tensor(-1))
            w[i, :len(m)] = mt.float() * a
        # token-level normalisation over the whole rollout: every sampled token in it counts the same. The
        # loop divides each micro-batch's loss by the number of chunks; multiplying by it undoes that.
        w = w * (self.chunks / n_tokens)
        if self.r.kl_coef > 0 and self.ref is not None:
            kl = self._kl_penalty(x, y)
            w = w - self.r.kl_coef * kl * (self.chunks / n_tokens)
            self.last_stats["kl"] = self.last_stats.get("kl", 0.0) + float((kl * (y >= 0)).sum()) / n_tokens
        return x, y, w

    @torch.no_grad()
    def _kl_penalty(self, x, y) -> torch.Tensor:
        """Per-token log pi(y) - log pi_ref(y) on the sampled tokens (the k1 estimator, used as a reward penalty)."""
        dev = self.engine.device
        pol = -self.engine.model(x.to(dev), y.to(dev), reduction="none").view_as(y)
        ref = -self.ref(x.to(dev), y.to(dev), reduction="none").view_as(y)
        return (pol - ref).cpu() * (y >= 0)


class DegenerationGuard:
    """Flags reward hacking: reward up while samples degenerate. Compares a recent window of steps with the
    first window of the run. Degenerate = repeated 3-gram rate above `max_repeat` and well above the start,
    or entropy collapsed: below `entropy_frac` of the start *and* down by at least `min_entropy_drop` nats.
    (A policy that is simply converging on a right answer also loses entropy: the tiny model learning to
    trust its calculator went 0.33 -> 0.08 nats/token with held-out accuracy 20% -> 70%. The absolute drop
    tells that apart from a collapse into loops, which the repeat rate catches anyway.)"""

    def __init__(self, window: int = 5, min_reward_gain: float = 0.1, max_repeat: float = 0.5,
                 entropy_frac: float = 0.25, min_entropy_drop: float = 0.5):
        self.window, self.min_gain, self.max_repeat, self.entropy_frac = window, min_reward_gain, max_repeat, entropy_frac
        self.min_entropy_drop = min_entropy_drop
        self.start: list[dict] = []
        self.recent: deque = deque(maxlen=window)
        self.reason = ""

    def update(self, s: dict) -> bool:
        if len(self.start) < self.window:
            self.start.append(s)
            return False
        self.recent.append(s)
        if len(self.recent) < self.window:
            return False

        def mean(rows, k):
            return sum(r[k] for r in rows) / len(rows)

        gain = mean(self.recent, "reward") - mean(self.start, "reward")
        rep0, rep = mean(self.start, "repeat_3gram"), mean(self.recent, "repeat_3gram")
        ent0, ent = mean(self.start, "entropy"), mean(self.recent, "entropy")
        looping = rep > self.max_repeat and rep > 2 * rep0
        collapsed = ent0 > 0 and ent < self.entropy_frac * ent0 and ent0 - ent >= self.min_entropy_drop
        if gain >= self.min_gain and (looping or collapsed):
            self.reason = (f"reward rose by {gain:+.2f} while samples degenerated: repeated 3-grams {rep0:.2f} -> {rep:.2f}, "
                           f"entropy {ent0:.2f} -> {ent:.2f} nats")
            return True
        return False


def rl_train_config(base: TrainConfig, r: RLConfig, rows: int, seq_len: int) -> TrainConfig:
    """The RL stage's loop settings, from the sft stage's (its learning rates, scaled by r.lr_scale in train()):
    one rollout of `rows` rows per step, updated on in micro-batches of at most r.device_batch rows (the
    largest such divisor of rows); constant LR, no compile (sequence lengths vary), and replicated weights,
    because rollouts run the model on each rank alone (it must not be FSDP-sharded)."""
    micro = max(d for d in range(1, min(rows, r.device_batch) + 1) if rows % d == 0)
    return dataclasses.replace(
        base, batch_tokens=rows * seq_len, device_batch=micro, max_steps=r.steps, time_minutes=r.time_minutes,
        tokens_per_param=0.0, warmup_frac=0.0, warmdown_frac=0.0, checkpoint_every=r.checkpoint_every,
        keep_checkpoints=6, compile=False, parallel="ddp")


class GuardHook:
    """The training loop's hook for RL: adds the rollouts' statistics (and now and then held-out accuracy) to
    every step's record, and stops the run when the degeneration guard trips."""

    def __init__(self, source: RolloutSource, r: RLConfig, eval_fn=None):
        self.source, self.r, self.eval_fn = source, r, eval_fn
        self.guard = DegenerationGuard() if r.guard else None

    def __call__(self, step: int, record: dict) -> str | None:
        record.update({k: round(v, 4) for k, v in self.source.last_stats.items()})
        if self.eval_fn is not None and (step % self.r.eval_every == 0 or step == 1):
            record["test_accuracy"] = self.eval_fn(step)
        print(f"rl: step {step} reward {record['reward']:.3f} len {record['length']:.1f} "
              f"entropy {record['entropy']:.2f} repeat {record['repeat_3gram']:.2f}"
              + (f" test {record['test_accuracy']:.1%}" if "test_accuracy" in record else ""), flush=True)
        if self.guard is not None and self.guard.update(self.source.last_stats):
            print(f"rl: GUARD: {self.guard.reason}; stopping and keeping the checkpoint from before", flush=True)
            return self.guard.reason
        return None


def rl_train(model, tok: Tokenizer, task, r: RLConfig, t: TrainConfig, run_dir, device, dtype, tools=None,
             eval_fn=None, resume: bool = False, meta: dict | None = None, ref_model=None, metrics=None,
             compile: bool = False):
    """Run GRPO on `task`'s rewards. eval_fn(step) -> float is called every r.eval_every steps (held-out
    accuracy). Returns (train result, guard report or None); when the guard trips, the stage is rolled back to
    its newest checkpoint from before the degenerate window. `compile`: rollouts by the compiled decode step
    (its weights are inputs, rebuilt after each update), built before the budget's clock starts."""
    engine = Engine(model, tok, device, dtype, tools=tools, compile=compile)
    engine.warm_up()
    source = RolloutSource(engine, task, r, ref_model, chunks=t.batch_tokens // (t.device_batch * model.cfg.seq_len))
    hook = GuardHook(source, r, eval_fn)
    res = train(model, t, "rl", run_dir, source, [], device, dtype, total_steps=t.max_steps or None, resume=resume,
                meta=meta, hooks=(hook,), metrics=metrics, lr_scale=r.lr_scale)
    if res.stop_reason is None:
        return res, None
    kept = RunDir(run_dir).roll_back("rl", res.steps - 2 * hook.guard.window)
    return res, {"step": res.steps, "reason": res.stop_reason, "kept": str(kept) if kept else None}


def run_rl(cfg: RunConfig, resume: bool = False, force: bool = False) -> RLSummary:
    check_budget(cfg, "rl")
    if not resume and not force:
        cfg.run.refuse_to_replace("rl")
    r = cfg.rl
    tok = Tokenizer.load(cfg.run.tokenizer_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.sft.dtype, device)
    parent, parent_ckpt = cfg.run.parent_checkpoint("rl")
    model, _ = load_model(parent_ckpt, device)
    ref = load_model(parent_ckpt, device)[0].eval() if r.kl_coef > 0 else None
    task = task_set(cfg)[r.task]
    tools = {**tools_for_run(cfg), **task.client_tools}  # a task's client functions answer as in eval
    t = rl_train_config(cfg.sft, r, r.prompts_per_step * r.samples_per_prompt, model.cfg.seq_len)
    # rollouts sample up to this many new tokens (steps win over a time budget; a budget at eager speed, ~1,600/s)
    sampled = (r.steps * r.prompts_per_step * r.samples_per_prompt * r.max_new_tokens if r.steps
               else int(r.time_minutes * 60 * 1600))
    compiled, note = decode_compile(r.compile, device, sampled)
    if note:
        print(f"rl: {note}", flush=True)
    if compiled:
        print(f"rl: {warm_up_note(device, '--set rl.compile=off skips it', dtype)}", flush=True)
    eval_engine = Engine(model, tok, device, dtype, tools=tools, compile=compiled)
    eval_engine.warm_up()  # before the budget's clock; if the steps cannot be built, both engines decode eagerly
    compiled = eval_engine.compile

    def eval_fn(step: int) -> float:
        return task_accuracy(eval_engine, tok, task, r.eval_n, cfg.eval.seed + 1, r.max_new_tokens)

    print(f"rl: from {parent} ({parent_ckpt.name}); task {r.task}; {r.prompts_per_step} prompts x "
          f"{r.samples_per_prompt} samples per step; budget {r.steps or f'{r.time_minutes:g} min'}")
    save_config(cfg)
    torch.manual_seed(cfg.seed + 2)
    t0 = time.time()
    metrics = MetricsSink.from_config(cfg.logging, cfg.run_dir, cfg.name, "rl", cfg.to_dict())
    res, tripped = rl_train(model, tok, task, r, t, cfg.run_dir, device, dtype, tools=tools, eval_fn=eval_fn,
                            resume=resume, meta={"base": str(parent_ckpt), "task": r.task}, ref_model=ref,
                            metrics=metrics, compile=compiled)
    hist = res.history
    summary = RLSummary(
        parent=parent, task=r.task, steps=res.steps, seconds=time.time() - t0, checkpoint=res.checkpoint,
        guard=tripped, reward_first=hist[0]["reward"] if hist else None,
        reward_last=sum(h["reward"] for h in hist[-5:]) / max(1, len(hist[-5:])) if hist else None,
        heldout=[(h["step"], h["test_accuracy"]) for h in hist if "test_accuracy" in h])
    cfg.run.write_summary("rl", summary)
    print(f"rl: {res.steps} steps in {summary.seconds:.0f}s; reward {summary.reward_first:.3f} -> "
          f"{summary.reward_last:.3f}" + (f"; GUARD tripped at step {tripped['step']}" if tripped else ""))
    return summary
