"""RL (GRPO) on verifiable rewards: learning signal, exact resume, and the reward-hacking guard."""
import random

import torch

from exocortex.config import RLConfig, TrainConfig
from exocortex.model import GPT
from exocortex.stages.rl import DegenerationGuard, repeated_ngram_rate, rl_train, rl_train_config
from exocortex.tasks.base import Task


class SayTask(Task):
    """One prompt; the reward is the share of the reply's characters that are 'd' or 'h' — trivially gameable
    by degenerate output like 'dhdhdh', Karpathy's example of reward hacking."""

    name = "say"

    def example(self, rng, split):
        return {"task": self.name, "answer": "", "messages": [{"role": "user", "content": "river town"},
                                                             {"role": "assistant", "content": ""}]}

    def grade(self, answer_text, example):
        return self.reward(answer_text, example) > 0.5

    def reward(self, answer_text, example):
        return sum(c in "dh" for c in answer_text) / max(8, len(answer_text))


def _rl(tmp_path, tok, small_cfg, steps, guard=True, lr=4.0):
    torch.manual_seed(0)
    model = GPT(small_cfg)
    r = RLConfig(steps=steps, time_minutes=0, prompts_per_step=2, samples_per_prompt=8, max_new_tokens=12,
                 checkpoint_every=3, guard=guard, seed=1, lr_scale=0.5)
    t = rl_train_config(TrainConfig(matrix_lr=0.02 * lr, embedding_lr=0.2 * lr, unembedding_lr=0.004 * lr * 25,
                                    dtype="float32"), r, 16, small_cfg.seq_len)
    res, tripped = rl_train(model, tok, SayTask(), r, t, tmp_path, torch.device("cpu"), torch.float32, tools={})
    return model, res, tripped


def test_repeated_ngram_rate():
    assert repeated_ngram_rate([1, 2, 3, 4, 5, 6]) == 0
    assert repeated_ngram_rate([7, 8] * 20) > 0.9
    assert repeated_ngram_rate([]) == 0


def test_guard_needs_both_reward_gain_and_degeneration():
    base = {"reward": 0.1, "entropy": 4.0, "repeat_3gram": 0.05}
    g = DegenerationGuard(window=3)
    for _ in range(3):
        assert not g.update(base)
    # reward up, samples still healthy: a genuine improvement is not flagged
    for _ in range(5):
        assert not g.update({**base, "reward": 0.9})
    g2 = DegenerationGuard(window=3)
    for _ in range(3):
        g2.update(base)
    # samples loop but the reward did not rise: not reward hacking either
    for _ in range(5):
        assert not g2.update({**base, "repeat_3gram": 0.9, "entropy": 0.2})
    g4 = DegenerationGuard(window=3)
    for _ in range(3):
        g4.update({"reward": 0.1, "entropy": 0.33, "repeat_3gram": 0.1})
    # a policy converging on right answers: low entropy got lower, repeats moderate: not flagged
    for _ in range(5):
        assert not g4.update({"reward": 0.7, "entropy": 0.07, "repeat_3gram": 0.27})
    g3 = DegenerationGuard(window=3)
    for _ in range(3):
        g3.update(base)
    tripped = [g3.update({"reward": 0.8, "entropy": 0.3, "repeat_3gram": 0.8}) for _ in range(3)]
    assert tripped == [False, False, True] and "reward rose" in g3.reason


def test_gameable_reward_trips_the_guard_and_keeps_an_earlier_checkpoint(tmp_path, tok, small_cfg):
    model, res, tripped = _rl(tmp_path, tok, small_cfg, steps=40, lr=0.3)
    rewards = [h["reward"] for h in res.history]
    assert tripped is not None, f"guard never tripped; rewards {rewards[:3]} ... {rewards[-3:]}"
    assert res.stop_reason and res.steps < 40
    assert sum(rewards[-3:]) / 3 > rewards[0] + 0.05  # the reward really was being hacked
    kept = tripped["kept"]
    if kept is not None:  # the stage's checkpoint is from before the degenerate window
        step = int(kept.rsplit("_", 1)[1])
        assert step <= tripped["step"] - 10
        from exocortex.run import RunDir
        assert str(RunDir(tmp_path).latest_checkpoint("rl")) == kept
