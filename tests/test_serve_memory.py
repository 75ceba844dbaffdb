"""Server memory stays bounded: 16 long replies at once (the tiny preset's shape, random weights, so every reply
peaked like a trained model's) used to take the process from 0.3 to 3.5 GB, for good (bench/serve_soak.py).
Runs the batcher in a fresh process, since the settings that bound it are read at oneDNN's first use."""
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import sys, threading
    import torch
    from exocortex.device import bound_memory
    if sys.argv[2] == "bounded":
        bound_memory()
    from exocortex.config import make_config
    from exocortex.device import resolve_dtype
    from exocortex.infer.engine import Batcher, Engine, Request
    from exocortex.model import GPT
    from exocortex.tokenizer import Tokenizer

    def rss_mb():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024

    tok = Tokenizer.load(sys.argv[1])
    shape = make_config("tiny").model
    shape.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = GPT(shape)
    with torch.no_grad():  # peaked replies, as a trained model's (the default init's are near uniform)
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.05)
    cpu = torch.device("cpu")
    engine = Engine(model, tok, cpu, resolve_dtype("auto", cpu))  # bf16 (oneDNN) where the CPU has it, as served
    batcher, done = Batcher(engine, 16), threading.Semaphore(0)
    before = rss_mb()
    for seed in range(16):
        batcher.submit(Request(tok.encode("the river", bos=True), on_token=lambda t, forced: True,
                               on_end=lambda *a: done.release(), max_tokens=600, temperature=1.0, seed=seed))
    for _ in range(16):
        done.acquire()
    print(round(rss_mb() - before))
""")


def growth_mb(tok_dir, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tok_dir), mode], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_long_replies_leave_memory_bounded(tok, tmp_path):
    tok.save(tmp_path)
    grew = growth_mb(tmp_path, "bounded")
    assert grew < 400, f"RSS grew by {grew} MB over 16 long replies"
