"""Test doubles for the decoder protocol (exocortex/infer/decode.py: DecoderLike), passed to Engine as `decoder`."""
import time

import torch


class Scripted:
    """A decoder factory whose decoders write a fixed script: each row's logits pick the row's next script
    token. A fed token that is not the one predicted was forced by the engine (tool output), so the row's
    script does not advance past it; prefill restarts the row's script. `script` may also be a function of
    the prompt (a conversation's turns answered differently). `steps` counts decode steps and
    `prompt_lengths` records every prefill, over all decoders made."""

    def __init__(self, script, vocab_size: int):
        self.script = script if callable(script) else list(script)
        self.vocab_size = vocab_size
        self.steps = 0
        self.prompt_lengths: list[int] = []

    def script_for(self, prompt: list[int]) -> list[int]:
        return list(self.script(prompt)) if callable(self.script) else self.script

    def __call__(self, batch_size: int, max_len: int) -> "ScriptedDecoder":
        return ScriptedDecoder(self, batch_size, max_len)


class ScriptedDecoder:
    def __init__(self, owner: Scripted, batch_size: int, max_len: int):
        self.owner, self.B, self.T = owner, batch_size, max_len
        self.at = [0] * batch_size  # per row: the index of its next script token
        # per row: its script (a script that depends on the prompt is set by prefill)
        self.scripts = [[0] if callable(owner.script) else owner.script] * batch_size
        self.lengths = [0] * batch_size  # per row: tokens in its cache (the real Decoder's limit applies)

    def _logits(self, rows) -> torch.Tensor:
        logits = torch.full((len(rows), self.owner.vocab_size), -1e9)
        for i, r in enumerate(rows):
            script = self.scripts[r]
            logits[i, script[min(self.at[r], len(script) - 1)]] = 0
        return logits

    def prefill(self, prompt: list[int], slots: list[int] | None = None) -> torch.Tensor:
        slots = list(range(self.B)) if slots is None else list(slots)
        if not 0 < len(prompt) < self.T:
            raise ValueError(f"a prompt of {len(prompt)} tokens does not fit a cache of {self.T}")
        self.owner.prompt_lengths.append(len(prompt))
        for s in slots:
            self.at[s], self.lengths[s] = 0, len(prompt)
            self.scripts[s] = self.owner.script_for(prompt)
        return self._logits(slots)

    def step(self, tokens: list[int], advance: list[bool] | None = None) -> torch.Tensor:
        moving = [r for r in range(self.B) if advance is None or advance[r]]
        for r in moving:
            script = self.scripts[r]
            if self.lengths[r] >= self.T:
                raise ValueError(f"a row is at the end of the cache ({self.T} tokens)")
            self.lengths[r] += 1
            if self.at[r] < len(script) and tokens[r] == script[self.at[r]]:
                self.at[r] += 1
        self.owner.steps += 1
        return self._logits(range(self.B))

    def release(self, slot: int) -> None:
        self.at[slot], self.lengths[slot] = 0, 0


class Paced:
    """Wraps a decoder factory: every decode step sleeps `pause` s (requests overlap, streaming shows) and is
    recorded in `rows_per_step` (rows it advanced); with `fail_after`, the steps after that many raise
    RuntimeError("boom"), as a device running out of memory might."""

    def __init__(self, factory, pause: float = 0.0, fail_after: int | None = None):
        self.factory, self.pause, self.fail_after = factory, pause, fail_after
        self.rows_per_step: list[int] = []

    def __call__(self, batch_size: int, max_len: int):
        dec = self.factory(batch_size, max_len)
        step = dec.step

        def paced(tokens, advance=None):
            if self.fail_after is not None and len(self.rows_per_step) >= self.fail_after:
                raise RuntimeError("boom")
            self.rows_per_step.append(len(tokens) if advance is None else sum(advance))
            time.sleep(self.pause)
            return step(tokens, advance)
        dec.step = paced
        return dec
