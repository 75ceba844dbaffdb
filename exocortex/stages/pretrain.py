"""Stage `pretrain`: train the base model on the run's tokens with the shared loop, rows packed best-fit
(data/loader.py), then measure its val bits-per-byte."""
from __future__ import annotations

import torch

from exocortex.config import RunConfig, budget_steps, check_budget, save_config
from exocortex.data.loader import train_source, val_batches
from exocortex.device import resolve_device, resolve_dtype
from exocortex.evals import bits_per_byte
from exocortex.model import GPT
from exocortex.run import PretrainSummary
from exocortex.tokenizer import Tokenizer
from exocortex.train import parallel
from exocortex.train.loop import train
from exocortex.train.metrics import MetricsSink


def run_pretrain(cfg: RunConfig, resume: bool = False, force: bool = False) -> PretrainSummary | None:
    check_budget(cfg, "pretrain")
    if not resume and not force:
        cfg.run.refuse_to_replace("pretrain")
    tok = Tokenizer.load(cfg.run.tokenizer_dir)
    cfg.model.vocab_size = tok.vocab_size
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.pretrain.dtype, device)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    n_params = model.num_params()
    t = cfg.pretrain
    source = train_source(cfg, cfg.model.seq_len, t.device_batch)
    val = val_batches(cfg, cfg.model.seq_len, t.device_batch, t.eval_tokens)
    steps = budget_steps(t, n_params)
    print(f"pretrain: {n_params / 1e6:.2f}M params, {cfg.model.depth} layers x {cfg.model.n_embd} wide, "
          f"vocab {cfg.model.vocab_size}, seq {cfg.model.seq_len}, {cfg.data.packing} packing; {device} "
          f"{str(dtype).replace('torch.', '')}; budget: " + (f"{steps} steps" if steps else f"{t.time_minutes} minutes"))
    if parallel.is_main():
        save_config(cfg)
    metrics = MetricsSink.from_config(cfg.logging, cfg.run_dir, cfg.name, "pretrain", cfg.to_dict())
    res = train(model, t, "pretrain", cfg.run_dir, source, val, device, dtype, total_steps=steps, resume=resume,
                metrics=metrics)
    bpb = bits_per_byte(model, tok, val, device, dtype)  # on every rank: an FSDP model's forward needs them all
    if not parallel.is_main():
        return None
    summary = PretrainSummary(
        params=n_params, flops_per_token=model.flops_per_token(), steps=res.steps, tokens=res.tokens,
        seconds=res.seconds, tokens_per_second=res.tokens_per_second, flops=res.flops, mfu=res.mfu,
        final_train_loss=res.final_train_loss, final_val_loss=res.final_val_loss, val_bpb=bpb,
        tokens_per_param=res.tokens / n_params, packing=cfg.data.packing, device=str(device), dtype=str(dtype),
        world_size=parallel.world_size(), parallel=t.parallel, time_budget_minutes=t.time_minutes if not steps else None,
        checkpoint=res.checkpoint)
    cfg.run.write_summary("pretrain", summary)
    print(f"pretrain: {res.steps} steps, {res.tokens:,} tokens in {res.seconds:.0f}s "
          f"({res.tokens_per_second:,.0f} tok/s); val loss {res.final_val_loss:.3f}, val bpb {bpb:.3f}")
    print(f"pretrain: {summary.spent_line()}")
    return summary
