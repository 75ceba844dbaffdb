"""A stand-in model for engine/server tests: it writes a fixed script of tokens."""
import torch


class Scripted(torch.nn.Module):
    """Predicts the next token of a fixed script. A fed token that is not the one it predicted was forced by the
    engine (tool output), so the script does not advance past it; a new prompt (prefill) restarts the script."""

    def __init__(self, cfg, script):
        super().__init__()
        self.cfg, self.script = cfg, list(script)
        self.rope_cos = torch.zeros(1000, 1)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.i = 0

    def forward(self, idx, cache=None):
        if idx.shape[1] > 1:
            self.i = 0
        elif idx[0, 0].item() == self.script[self.i]:
            self.i += 1
        logits = torch.full((idx.shape[0], idx.shape[1], self.cfg.vocab_size), -1e9)
        logits[:, -1, self.script[self.i]] = 0
        return logits
