"""Fast single-token decoding for GPT: an inference-only path next to model.py (which training and export use).

`Decoder` holds a static KV cache for a fixed number of rows (slots) and a fixed length, and a position per
row, so rows can be at different lengths: a row's new key/value is written at its own position, and its query
attends only to keys 0..pos (a mask). We chose per-row positions over left padding because continuous batching
(serve.py) admits requests into a running batch: with left padding every join would shift the other rows'
caches or re-pad the newcomer to the batch's length; with per-row positions a newcomer fills its own slot
from position 0 and nobody else moves.

The step is written for small models, where a decode step is a few hundred small ops whose per-op overhead,
not the FLOPs, is the cost:
- q/k/v and gate/up projections are one matmul each (weights concatenated once and rebuilt when the model's
  parameters change, e.g. between RL updates; the model's own parameters and names are untouched);
- q-norm and k-norm run as one op (gains stacked), rotary embeddings for q and k as one, 1/sqrt(head_dim) is
  folded into the q-norm gain, and residual adds into the output matmuls (addmm);
- optionally the step is `torch.compile`d (the elementwise ops fuse; one graph serves every batch size and
  length) and, on CUDA, replays as CUDA graphs. On CPU a single row's matmuls are then written as
  multiply-and-sum over (out, in) weights, which inductor fuses into its kernels and runs on all threads
  (PyTorch's CPU BLAS runs a one-row matmul on one thread); the weights' shapes are marked static so the
  kernels are specialized to them. On CPU the steps (one row, and several rows) are moreover compiled ahead
  of time (AheadOfTimeStep: AOTInductor), which drops torch.compile's per-call guards and Python wrapper and
  lets a new process load the compiled step instead of tracing it again.

Prefill (a whole prompt at once) is the same computation with T tokens in one row and causal attention.
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
import tempfile
import threading
import warnings
from typing import Protocol

import torch
import torch.nn.functional as F

from exocortex.infer import native
from exocortex.infer.native import NativeStep
from exocortex.model import GPT

MIN_SPAN = 64  # with CUDA graphs, steps attend over a power-of-two prefix of the cache, at least this long


def _rms(x: torch.Tensor, gain: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 like model.RMSNorm (gain may hold one row per head: stacked q/k gains; None
    when it is folded into the next matrix, see FusedWeights)."""
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x if gain is None else x * gain


class FusedWeights:
    """The model's weights rearranged for decoding, in the compute dtype (norm gains and rotary tables stay
    float32). Rebuilt when a parameter changed in place (its version counter moved) or was replaced."""

    def __init__(self, model: GPT, dtype: torch.dtype = torch.float32):
        self.model, self.dtype = model, dtype
        self._stamp, self._w = None, None
        self.packed = None  # the last weights packed for the C step (native.PackedWeights)

    def get(self, check: bool = True, rows: bool = False) -> dict:
        """The fused weights; with check=False the last built ones are trusted (within one generation).

        Every matrix is given as an (in, out) tensor `w_t` (`x @ w_t`). By default the q/k/v, gate/up and head
        matrices are contiguous that way (the fastest layout for BLAS one-row matmuls); with rows=True every
        matrix is an (in, out) view of a contiguous (out, in) one, so `w_t.t()` is contiguous: the layout the
        compiled CPU step's multiply-and-sum reads (see decode_step's `gemv`). Asking for the other layout
        rebuilds the weights (one layout is kept, not both).

        In the rows layout the RMSNorm gains in front of q/k/v, gate/up and the head are folded into those
        matrices' columns (`ln1`, `ln2` and `norm` are then None): rms(x) * g @ W == rms(x) @ (W * g). Inductor
        inlines a norm into the multiply-and-sum that reads it, recomputing it for every output row; folded,
        that inner loop reads one vector less and multiplies once less (A/B of the tiny model's compiled
        one-row step, 1 thread, bf16: 0.97 -> 0.85 ms with the 1/rms scale applied after the sum, _normed_mm)."""
        if self._w is not None and not check and self._w["rows"] == rows:
            return self._w
        stamp = (tuple((p.data_ptr(), p._version) for p in self.model.parameters()), rows)
        if stamp != self._stamp:
            with torch.no_grad():
                self._w = self._build(rows)
                tensors = _tensors({k: v for k, v in self._w.items() if k != "rows"})
                if self._w["head_t"].is_cuda:  # CUDA graphs read the weights in place (static addresses)
                    for t in tensors:
                        torch._dynamo.mark_static_address(t)
                elif rows:  # compiled on CPU: kernels specialized to the weights' shapes (dynamic=True otherwise)
                    for t in tensors:
                        torch._dynamo.mark_static(t)
            self._stamp = stamp
        return self._w

    def _build(self, rows: bool) -> dict:
        m, dt = self.model, self.dtype
        c = m.cfg
        H, KV, hd = c.n_heads, c.kv_heads, c.head_dim
        _t = _rows_t if rows else _cols_t

        def normed(gain: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
            """(the norm gain, the matrix it feeds), the gain folded into the matrix in the rows layout."""
            if rows:
                return None, _rows_t(weight.float() * gain.float(), dt)
            return gain.float(), _t(weight, dt)

        layers = []
        for blk in m.model.layers:
            a, mlp = blk.self_attn, blk.mlp
            qk_gain = torch.cat([a.q_norm.weight.float().expand(H, hd) / math.sqrt(hd),
                                 a.k_norm.weight.float().expand(KV, hd)])
            ln1, wqkv_t = normed(blk.input_layernorm.weight, torch.cat([a.q_proj.weight, a.k_proj.weight,
                                                                        a.v_proj.weight]))
            ln2, wgu_t = normed(blk.post_attention_layernorm.weight, torch.cat([mlp.gate_proj.weight,
                                                                                mlp.up_proj.weight]))
            layers.append(dict(ln1=ln1, ln2=ln2, wqkv_t=wqkv_t, qk_gain=qk_gain, wo_t=_rows_t(a.o_proj.weight, dt),
                               wgu_t=wgu_t, wdown_t=_rows_t(mlp.down_proj.weight, dt)))
        half = hd // 2
        sin = m.rope_sin.float()
        # rotate_half(x) * sin == roll(x, half) * (sin with its first half negated): a roll instead of a cat
        sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        norm, head_t = normed(m.model.norm.weight, m.lm_head.weight)
        return dict(embed=m.model.embed_tokens.weight, norm=norm, head_t=head_t, cos=m.rope_cos.float(), sin=sin,
                    layers=layers, rows=rows)


def _cols_t(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An (out, in) weight as a contiguous (in, out) matrix: `x @ w_t` reads it row by row, which CPU GEMV
    kernels do faster than `F.linear(x, w)` (fp32, one row: 19 vs 27 us for the tiny model's q/k/v, 70 vs
    106 us for its head). For the output matmuls (addmm into the residual) the transposed view is as fast, so
    they keep it. The compiled CPU step uses the rows layout instead (_rows_t)."""
    return weight.detach().to(dtype).t().contiguous()


def _rows_t(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An (out, in) weight as an (in, out) view of a contiguous (out, in) matrix (no copy when the dtype
    matches)."""
    return weight.detach().to(dtype).contiguous().t()


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, list):
        return [t for v in tree for t in _tensors(v)]
    return [] if tree is None else [tree]


def _mm(x: torch.Tensor, w_t: torch.Tensor, gemv: bool) -> torch.Tensor:
    """x @ w_t. With gemv (compiled, rows layout): the same as a multiply-and-sum over the contiguous (out, in)
    matrix, accumulated in float32, which inductor turns into a reduction fused with its neighbours and split
    across threads; eagerly it would materialize the product, so only the compiled step uses it."""
    if gemv:
        return (x.float()[:, None, :] * w_t.t().float()).sum(-1)
    return x @ w_t


def _normed_mm(x: torch.Tensor, gain: torch.Tensor | None, w_t: torch.Tensor, eps: float,
               gemv: bool) -> torch.Tensor:
    """rms(x) * gain @ w_t. With gemv and the gain folded into w_t, the 1/rms scale multiplies the sums
    instead of every input: the inner loop is then a plain multiply-and-sum of the residual stream (float32,
    not rounded to the weights' dtype first: as exact as the eager path or more)."""
    if gemv and gain is None:
        x = x.float()
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (x[:, None, :] * w_t.t().float()).sum(-1)
    return _mm(_rms(x, gain, eps).to(w_t.dtype), w_t, gemv)


def _residual(x: torch.Tensor, y: torch.Tensor, w_t: torch.Tensor, gemv: bool = False) -> torch.Tensor:
    """x + y @ w_t; one addmm when dtypes agree (fp32), else the float32 residual stream plus a low-precision
    matmul, as autocast computes it."""
    if gemv:
        return x + _mm(y, w_t, gemv)
    return torch.addmm(x, y, w_t) if y.dtype == x.dtype else x + (y @ w_t).float()


def decode_step(w: dict, k_cache: list, v_cache: list, tokens: torch.Tensor, pos: torch.Tensor,
                span: int, n_heads: int, n_kv: int, eps: float, gemv: bool = False) -> torch.Tensor:
    """One token per row: tokens (B,) at positions pos (B,) -> logits (B, V) float32. Writes each row's
    key/value at its position; row b attends to keys 0..pos[b] among the first `span` (> max pos). The residual
    stream is float32 (as under autocast); matmuls run in the weights' dtype (with `gemv`, float32 sums of
    products: see _mm). Pure tensor code for torch.compile."""
    B = tokens.shape[0]
    hd = k_cache[0].shape[-1]
    rep, half, nq = n_heads // n_kv, hd // 2, n_heads + n_kv
    dt = w["head_t"].dtype
    rows = torch.arange(B, device=tokens.device)
    # an additive mask shared by all layers: 0 for keys at or before the row's position, -inf after
    hidden = torch.arange(span, device=tokens.device)[None, :] > pos[:, None]
    mask = torch.zeros(B, 1, 1, span, device=tokens.device).masked_fill(hidden[:, None, None, :], float("-inf"))
    cos, sin = w["cos"][pos][:, None, :], w["sin"][pos][:, None, :]  # (B, 1, hd)
    x = w["embed"][tokens].float()
    for layer, L in enumerate(w["layers"]):
        qkv = _normed_mm(x, L["ln1"], L["wqkv_t"], eps, gemv)
        qk = _rms(qkv[:, :nq * hd].view(B, nq, hd), L["qk_gain"], eps)
        qk = qk * cos + qk.roll(half, dims=-1) * sin
        kc, vc = k_cache[layer], v_cache[layer]
        kc[rows, :, pos] = qk[:, n_heads:].to(kc.dtype)
        vc[rows, :, pos] = qkv[:, nq * hd:].view(B, n_kv, hd).to(vc.dtype)
        q = qk[:, :n_heads].reshape(B, n_kv, rep, hd).to(kc.dtype)
        att = torch.matmul(q, kc[:, :, :span].transpose(-1, -2)).float() + mask  # (B, KV, rep, span)
        y = torch.matmul(torch.softmax(att, dim=-1).to(vc.dtype), vc[:, :, :span])
        x = _residual(x, y.reshape(B, n_heads * hd).to(dt), L["wo_t"], gemv)
        gate, up = _normed_mm(x, L["ln2"], L["wgu_t"], eps, gemv).chunk(2, dim=-1)
        x = _residual(x, F.silu(gate) * up, L["wdown_t"], gemv)
    return _normed_mm(x, w["norm"], w["head_t"], eps, gemv).float()


def prefill_row(w: dict, k_cache: list, v_cache: list, tokens: torch.Tensor, slot: int, n_heads: int, n_kv: int,
                eps: float) -> torch.Tensor:
    """A whole prompt (T,) into one row of the cache from position 0 -> the last position's logits (V,) float32.
    The same math as decode_step with T queries per row and causal attention; only the last position goes
    through the output head. (The model's own forward would also work, but under autocast it casts every
    weight to bf16 on every call, and it computes logits for every position.)"""
    T = tokens.shape[0]
    hd = k_cache[0].shape[-1]
    rep, half, nq = n_heads // n_kv, hd // 2, n_heads + n_kv
    dt = w["head_t"].dtype
    cos, sin = w["cos"][:T, None, :], w["sin"][:T, None, :]  # (T, 1, hd)
    x = w["embed"][tokens].float()
    for layer, L in enumerate(w["layers"]):
        qkv = _rms(x, L["ln1"], eps).to(dt) @ L["wqkv_t"]
        qk = _rms(qkv[:, :nq * hd].view(T, nq, hd), L["qk_gain"], eps)
        qk = (qk * cos + qk.roll(half, dims=-1) * sin).transpose(0, 1)  # (heads, T, hd)
        kc, vc = k_cache[layer], v_cache[layer]
        k = qk[n_heads:].to(kc.dtype)
        v = qkv[:, nq * hd:].view(T, n_kv, hd).transpose(0, 1).to(vc.dtype)
        kc[slot, :, :T], vc[slot, :, :T] = k, v
        q = qk[:n_heads].reshape(n_kv, rep, T, hd).to(kc.dtype)  # q already carries 1/sqrt(head_dim)
        y = F.scaled_dot_product_attention(q, k[:, None].expand(n_kv, rep, T, hd),
                                           v[:, None].expand(n_kv, rep, T, hd), is_causal=True, scale=1.0)
        x = _residual(x, y.reshape(n_heads, T, hd).transpose(0, 1).reshape(T, n_heads * hd).to(dt), L["wo_t"])
        gate, up = (_rms(x, L["ln2"], eps).to(dt) @ L["wgu_t"]).chunk(2, dim=-1)
        x = _residual(x, F.silu(gate) * up, L["wdown_t"])
    return (_rms(x[-1], w["norm"], eps).to(dt) @ w["head_t"]).float()


_compiled: dict = {}


def _compiled_step(device_type: str):
    """decode_step under torch.compile with dynamic shapes: rows, cache length and span are symbolic, so one
    graph (two: a single row is specialized) serves every call; on CUDA it replays as CUDA graphs (mode
    "reduce-overhead"), one recorded per distinct shape, which is why the Decoder rounds shapes there."""
    if device_type not in _compiled:
        mode = "reduce-overhead" if device_type == "cuda" else None
        _compiled[device_type] = torch.compile(decode_step, dynamic=True, fullgraph=True, mode=mode)
    return _compiled[device_type]


def _flatten(tree) -> list:
    """The tensors of a weights dict in a fixed order (what the ahead-of-time step takes as inputs)."""
    return _tensors({k: v for k, v in tree.items() if k != "rows"})


def _unflatten(like: dict, flat: list) -> dict:
    it = iter(flat)

    def rebuild(tree):
        if isinstance(tree, dict):
            return {k: v if k == "rows" else rebuild(v) for k, v in tree.items()}
        if isinstance(tree, list):
            return [rebuild(v) for v in tree]
        return None if tree is None else next(it)  # a folded norm gain is no input
    return rebuild(like)


_UNPACK_LOCK = threading.Lock()


def _load_package(path: str):
    """AOTInductor unpacks a package's library into a new folder under $TMPDIR and deletes it only when the
    loader is destroyed, which a process killed by a signal (a stopped server) never does: one folder left per
    start. Unpacked into a folder of our own instead and deleted at once: the loader reads every file while it
    loads (the weights are inputs, not files), and the library stays mapped. $TMPDIR is the process's, so this
    runs once per step at start-up, under a lock. (A torch whose loader ignores $TMPDIR unpacks into /tmp as
    before.)"""
    with _UNPACK_LOCK:
        own = tempfile.mkdtemp(prefix="exocortex-aoti-")
        saved = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = own  # the loader (C++) reads it when it unpacks
        try:
            return torch._inductor.aoti_load_package(path)
        finally:
            if saved is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved
            shutil.rmtree(own, ignore_errors=True)


class AheadOfTimeStep:
    """A CPU decode step compiled ahead of time with AOTInductor (torch.export + a C++ .so): the one-row step
    (multiply-and-sum matmuls, see _mm), or the step of several rows (BLAS matmuls; the number of rows is
    dynamic, from 2 up).

    Under torch.compile every call also runs dynamo's guard checks and inductor's Python wrapper (~0.3 ms
    per step on a 2-core CPU, as much as a third of a small model's step; with several rows the wrapper also
    calls each matmul from Python), and every new process traces the step again before inductor's cache
    answers (~10 s for the tiny model under load). The ahead-of-time .so is called from C++ with the weights,
    caches, tokens and positions as inputs: no guards, no Python around the kernels, and a new process only
    loads it (~1 s). The cache length and the attended span are dynamic and the weights are inputs (not baked
    in), so one package serves every checkpoint of a shape: it is built once (~30 s on 2 cores) and kept on
    disk under a key of the shapes, dtypes, thread count, CPU instruction set and torch version
    ($EXOCORTEX_CACHE, default ~/.cache/exocortex)."""

    def __init__(self, key: str, w: dict, k_cache: list, n_heads: int, n_kv: int, eps: float, limit: int,
                 one_row: bool = True):
        path = os.path.join(aot_cache_dir(), hashlib.sha256(key.encode()).hexdigest()[:24] + ".pt2")
        args = (w, k_cache, (n_heads, n_kv, eps), limit, path, one_row)
        if not os.path.exists(path):
            self._build(*args)
        try:
            self.runner = _load_package(path)
        except Exception:  # noqa: BLE001 - a damaged cache file: build it again, once
            self._build(*args)
            self.runner = _load_package(path)
        self.keys = torch.arange(limit)  # the span reaches the .so as the length of keys[:span]
        self._w, self._flat = None, None
        # the loader's flat entry point (inputs in the order the package's pytree flattens them), where this torch
        # has one
        self._run = getattr(getattr(self.runner, "loader", None), "boxed_run", None)

    @staticmethod
    def _build(like: dict, k_cache: list, args: tuple, limit: int, path: str, one_row: bool) -> None:
        class Step(torch.nn.Module):
            def forward(self, tokens, pos, keys, weights, ks, vs):
                return decode_step(_unflatten(like, weights), ks, vs, tokens, pos, keys.shape[0], *args, one_row)

        flat, (_, kv, _, hd) = _flatten(like), k_cache[0].shape
        span, length = torch.export.Dim("span", min=2, max=limit), torch.export.Dim("length", min=3, max=limit)
        n = 1 if one_row else 2  # several rows: 2 stands for any number (0 and 1 would be specialized)
        rows = None if one_row else torch.export.Dim("rows", min=2, max=max(limit, 2))
        shapes = {"tokens": {0: rows} if rows else None, "pos": {0: rows} if rows else None, "keys": {0: span},
                  "weights": [None] * len(flat), "ks": [{0: rows, 2: length} if rows else {2: length}] * len(k_cache)}
        shapes["vs"] = shapes["ks"]
        ks = [torch.zeros(n, kv, 8, hd, dtype=k_cache[0].dtype) for _ in k_cache]
        example = (torch.zeros(n, dtype=torch.long), torch.full((n,), 3), torch.arange(4), flat, ks,
                   [torch.zeros_like(t) for t in ks])
        program = torch.export.export(Step(), example, dynamic_shapes=shapes)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=os.path.dirname(path))
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
            os.replace(tmp, path)  # atomic: a concurrent or interrupted build never leaves half a package
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def __call__(self, w: dict, k_cache: list, v_cache: list, tokens: torch.Tensor, pos: torch.Tensor,
                 span: int) -> torch.Tensor:
        if w is not self._w:  # flattened once per weights build, not every step
            self._w, self._flat = w, _flatten(w)
        if self._run is None:  # the package's own __call__ flattens every argument again (pytree) on every step
            return self.runner(tokens, pos, self.keys[:span], self._flat, k_cache, v_cache)
        return self._run([tokens, pos, self.keys[:span], *self._flat, *k_cache, *v_cache])[0]


_ahead_of_time: dict = {}


def _ahead_of_time_step(w: dict, k_cache: list, n_heads: int, n_kv: int, eps: float,
                        limit: int, one_row: bool = True) -> AheadOfTimeStep | None:
    """The shared AheadOfTimeStep for these shapes (one row, or several), built on first use; None where
    AOTInductor cannot build one here (no C++ compiler, an unsupported torch): the caller then uses the
    torch.compile'd step."""
    # everything the .so was specialized to; the CPU's instruction set too (a shared home directory on a
    # cluster of mixed machines must not hand an AVX-512 build to an AVX2 machine)
    key = repr(([(tuple(t.shape), t.stride(), str(t.dtype)) for t in _flatten(w)], k_cache[0].shape[1],
                k_cache[0].shape[3], str(k_cache[0].dtype), len(k_cache), n_heads, n_kv, eps, limit,
                torch.get_num_threads(), torch.backends.cpu.get_cpu_capability(), torch.__version__,
                sys.version_info[:2]) + (() if one_row else ("rows",)))
    if key not in _ahead_of_time:
        try:
            _ahead_of_time[key] = AheadOfTimeStep(key, w, k_cache, n_heads, n_kv, eps, limit, one_row)
        except Exception as e:  # noqa: BLE001 - any failure to build leaves the (slower) compiled step
            warnings.warn(f"ahead-of-time decode step unavailable ({type(e).__name__}: {str(e)[:200]}); "
                          "using torch.compile", stacklevel=2)
            _ahead_of_time[key] = None
    return _ahead_of_time[key]


def aot_cache_dir() -> str:
    """Where AheadOfTimeStep keeps its packages ($EXOCORTEX_CACHE/decode)."""
    root = os.environ.get("EXOCORTEX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "exocortex"))
    return os.path.join(root, "decode")


def warm_up_note(device: torch.device, skip: str = "--no-compile skips it", dtype: torch.dtype | None = None) -> str:
    """The line shown before a process compiles its decode step: what it costs and where the result is kept.
    In bf16 on a CPU with AVX512-BF16 the steps run in C (native.py): built once in about a second. Elsewhere on
    CPU the steps are compiled ahead of time into our cache (aot_cache_dir), so a later process only loads them
    (~3 s for the tiny model); on GPUs torch.compile traces again in every process and inductor's cache
    ($TORCHINDUCTOR_CACHE_DIR, by default under the system's temp directory) spares the code generation."""
    if device.type == "cpu" and dtype == torch.bfloat16 and native.unavailable() is None:
        return f"building the decode step in C (once, ~1 s; kept in {native.cache_dir()}; {skip}) ..."
    if device.type == "cpu":
        where = aot_cache_dir()
    else:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        where = f"torch inductor's cache, {cache_dir()}"
    return (f"compiling the decode step (the first time for a model shape takes a minute or more: ~70 s on 2 "
            f"CPU cores for the tiny model; then it is cached in {where}; {skip}) ...")


_compile_status: dict = {}


def compile_status(device: torch.device) -> tuple[bool, str | None]:
    """Whether the compiled decode step can run on `device` here, and if not one line saying why (callers then
    decode eagerly). It needs dynamo (a supported Python), and a toolchain for inductor's kernels: a C++
    compiler on CPU, Triton on CUDA; other devices (MPS, ...) are not tuned for and stay eager. Where it runs
    it pays (docs/benchmarks.md: faster one-row and batched steps on CPU; CUDA graphs on GPU)."""
    if device.type not in _compile_status:
        _compile_status[device.type] = _check_compile(device.type)
    why = _compile_status[device.type]
    return why is None, why


def _check_compile(device_type: str) -> str | None:
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version_info[0]}.{sys.version_info[1]} in torch {torch.__version__}"
    if device_type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - inductor raises its own types (InvalidCxxCompiler, ...)
            return (f"no C++ compiler for torch.compile's CPU kernels ({type(e).__name__}); install g++ or set "
                    "CXX")
        return None
    if device_type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "Triton is not installed (torch.compile's CUDA kernels need it)"
    return f"the compiled decode step is only built for CPU and CUDA, not {device_type}"


class DecoderLike(Protocol):
    """What Engine.generate and Batcher drive: a fixed number of rows (slots), each with its own position.
    `Decoder` is the implementation; tests script the logits through this protocol instead of a model."""

    def prefill(self, prompt: list[int], slots: list[int] | None = None) -> torch.Tensor:
        """Start each of `slots` (default: every row) on `prompt` -> next-token logits, one row per slot."""

    def step(self, tokens: list[int], advance: list[bool] | None = None) -> torch.Tensor:
        """Feed one token per row; rows with advance=False stay put -> next-token logits of (at least) every
        row up to the last advancing one."""

    def release(self, slot: int) -> None:
        """Free a slot for a later prefill."""


class Decoder:
    """A static per-row KV cache and the decode step for one GPT (a DecoderLike).

    Rows are slots. `prefill(prompt, slots)` fills slots from position 0 and returns their next-token logits;
    `step(tokens, advance)` feeds one token per row and returns every row's next-token logits. A row with
    advance=False (a free slot, or a row waiting for a tool's output) keeps its position: the step writes a
    throwaway key/value there, which the row's next real token overwrites. `lengths` mirrors the positions in
    Python so limits are checked without synchronizing with the device."""

    def __init__(self, model: GPT, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32,
                 compile: bool = False, weights: FusedWeights | None = None, native_step: bool = True):
        limit = model.rope_cos.shape[0]
        if not 0 < max_len <= limit:
            raise ValueError(f"cache length {max_len} is outside 1..{limit} (the rotary table)")
        c = model.cfg
        self.model, self.B, self.T, self.dtype, self.compile = model, batch_size, max_len, dtype, compile
        self.device = next(model.parameters()).device
        self.weights = weights if weights is not None else FusedWeights(model, dtype)
        shape = (batch_size, c.kv_heads, max_len, c.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(c.depth)]
        self.v = [torch.zeros(shape, device=self.device, dtype=dtype) for _ in range(c.depth)]
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.lengths = [0] * batch_size
        self._step = _compiled_step(self.device.type) if compile else decode_step
        self.cuda_graphs = compile and self.device.type == "cuda"
        self.gemv = compile and self.device.type == "cpu"  # one-row steps as multiply-and-sum (see _mm) ...
        self._one_row = None  # ... run by an AheadOfTimeStep where one can be built (first one-row step)
        self._several_rows = None  # steps of several rows too (their own AheadOfTimeStep)
        # or steps and prefill in C (bf16 on AVX512-BF16: native.py; native_step=False keeps the torch steps)
        self._native: NativeStep | bool | None = None if native_step else False
        self.one_row_threads: int | None = None  # the C step's threads for one row (None: torch's; see Batcher)
        self._views: dict = {}

    @torch.inference_mode()
    def prefill(self, prompt: list[int], slots: list[int] | None = None) -> torch.Tensor:
        """Run `prompt` through the model once and give its keys/values to each of `slots` (default: every
        row); returns the next-token logits, one row per slot, float32."""
        slots = list(range(self.B)) if slots is None else list(slots)
        n = len(prompt)
        if not 0 < n < self.T:
            raise ValueError(f"a prompt of {n} tokens does not fit a cache of {self.T}")
        w = self.weights.get(rows=self.gemv)  # checked here, not every step: no parameter changes mid-generation
        c = self.model.cfg
        ids = torch.tensor(prompt, dtype=torch.long, device=self.device)
        step = self._native_step()
        if step is not None:
            logits = step.prefill(w, prompt, slots[0])
        else:
            logits = prefill_row(w, self.k, self.v, ids, slots[0], c.n_heads, c.kv_heads, c.norm_eps)
        if len(slots) > 1:  # samples of one prompt share its keys/values
            idx = torch.tensor(slots[1:], device=self.device)
            for layer in range(len(self.k)):
                self.k[layer][idx, :, :n] = self.k[layer][slots[0], :, :n]
                self.v[layer][idx, :, :n] = self.v[layer][slots[0], :, :n]
        self.pos[torch.tensor(slots, device=self.device)] = n
        for s in slots:
            self.lengths[s] = n
        return logits.expand(len(slots), -1)

    @torch.inference_mode()
    def step(self, tokens: list[int], advance: list[bool] | None = None) -> torch.Tensor:
        """Feed one token per row (B,); rows with advance=False keep their position. Returns the logits of
        rows 0..n-1, (n, V) float32, n being one past the last advancing row: rows after it are not computed
        (callers keep busy rows in low slots), which makes a lone request on a wide batch cheap."""
        moving = range(self.B) if advance is None else [r for r in range(self.B) if advance[r]]
        if not moving:
            raise ValueError("no row to advance")
        top = max(self.lengths[r] for r in moving)
        if top >= self.T:
            raise ValueError(f"a row is at the end of the cache ({self.T} tokens)")
        n = moving[-1] + 1
        # attend over the used prefix only and compute only the first n rows; with CUDA graphs (one per shape)
        # both are rounded up to powers of two so a few graphs serve every step
        span = top + 1
        if self.cuda_graphs:
            n = min(self.B, 1 << (n - 1).bit_length())
            span = min(self.T, max(MIN_SPAN, 1 << top.bit_length()))
        c = self.model.cfg
        ids = torch.tensor(tokens[:n], dtype=torch.long, device=self.device)
        k, v, pos = self._rows(n)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        w = self.weights.get(check=False, rows=self.gemv)
        aot = self._ahead_of_time(w, k, n == 1) if self.gemv and span >= 2 and self.T >= 3 else None
        if aot is not None and aot is self._native_step():
            logits = aot(w, k, v, ids, pos, span, self.one_row_threads if n == 1 else None)
        elif aot is not None:
            logits = aot(w, k, v, ids, pos, span)
        else:
            logits = self._step(w, k, v, ids, pos, span, c.n_heads, c.kv_heads, c.norm_eps, self.gemv and n == 1)
        if self.cuda_graphs:
            logits = logits.clone()  # the graph's output buffer is overwritten by the next replay
        if advance is None:
            self.pos += 1
        elif len(moving) == n:  # rows 0..n-1 all moved (the usual case): one in-place add on their view
            pos += 1
        else:
            self.pos += torch.tensor(advance, device=self.device)
        for r in moving:
            self.lengths[r] += 1
        return logits

    def _ahead_of_time(self, w: dict, k: list, one_row: bool) -> AheadOfTimeStep | NativeStep | None:
        """The step of one row or of several: the C step where it runs (_native_step), else compiled ahead of
        time (built on first use)."""
        attr = "_one_row" if one_row else "_several_rows"
        if getattr(self, attr) is None:
            c = self.model.cfg
            setattr(self, attr, self._native_step() or _ahead_of_time_step(
                w, k, c.n_heads, c.kv_heads, c.norm_eps, self.model.rope_cos.shape[0], one_row) or False)
        return getattr(self, attr) or None

    def _native_step(self) -> NativeStep | None:
        """The steps and prefill in C (native.py), compiled on CPU in bf16 where the CPU has AVX512-BF16."""
        if self._native is None:
            c = self.model.cfg
            ok = self.gemv and self.dtype == torch.bfloat16 and native.unavailable() is None
            self._native = NativeStep(self.weights, self.k, self.v, c.n_heads, c.kv_heads, c.norm_eps) if ok else False
        return self._native or None

    def _rows(self, n: int) -> tuple[list, list, torch.Tensor]:
        """Views of the caches and positions of rows 0..n-1, made once per n (CUDA graphs need their inputs at
        fixed addresses, marked as such; compiled on CPU, only rows and length vary: kernels are specialized
        to the number of heads and the head size)."""
        if n not in self._views:
            views = ([t[:n] for t in self.k], [t[:n] for t in self.v], self.pos[:n])
            if self.cuda_graphs:
                for t in views[0] + views[1] + [views[2]]:
                    torch._dynamo.mark_static_address(t)
            elif self.gemv:
                for t in views[0] + views[1]:
                    torch._dynamo.mark_static(t, 1)
                    torch._dynamo.mark_static(t, 3)
            self._views[n] = views
        return self._views[n]

    def release(self, slot: int) -> None:
        """Free a slot: it goes back to position 0."""
        self.pos[slot] = 0
        self.lengths[slot] = 0
