"""The one-row CPU decode step in C (cpu_step.c), for bf16 weights on CPUs with AVX512-BF16.

A lone request decodes one row per step, and there every matrix is read once per token: the step's time is
the speed of its matrix-vector products. cpu_step.c packs the weights so that AVX512-BF16's `vdpbf16ps`
computes them from bf16 directly (docs/benchmarks.md: the tiny model's one-row step ~2x faster than the
AOTInductor step). Decoder.step uses it for one-row steps where `available()` says it can run; steps of several
rows, prefill and every other dtype or CPU keep the compiled torch step.

The C file is compiled once per source, compiler and flags with the system's C compiler, linked against the
OpenMP runtime torch already loaded (one thread pool in the process, not two), and kept under
$EXOCORTEX_CACHE/native. It is called through ctypes, which releases the GIL while it runs: a server's event
loop streams tokens meanwhile.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_step.c")
_BF16_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]


class _Matrix(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("in_", ctypes.c_int), ("out", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Matrix), ("o", _Matrix), ("gu", _Matrix), ("down", _Matrix), ("qk_gain", ctypes.c_void_p),
                ("k", ctypes.c_void_p), ("v", ctypes.c_void_p)]


_SCRATCH = ("x", "out", "qk", "att", "y", "scale", "xb")


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("depth", "dim", "n_heads", "n_kv", "head_dim", "ffn", "vocab",
                                                  "max_len", "max_rows", "cache_rows")] + [
        ("eps", ctypes.c_float), ("embed", ctypes.c_void_p), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
        ("head", _Matrix), ("layers", ctypes.POINTER(_Layer)), ("out_stride", ctypes.c_int),
        ("in_stride", ctypes.c_int)] + [(name, ctypes.c_void_p) for name in _SCRATCH]


def _openmp_runtime() -> str | None:
    """The OpenMP library this process already has loaded (torch's), so the step joins its thread pool."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "libgomp" in os.path.basename(path) and os.path.exists(path):
                    return path
    except OSError:
        pass
    return None


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


_why_not: dict = {}
_libs: dict = {}
_lock = threading.Lock()


def unavailable(native_kernel: bool = True) -> str | None:
    """None where the C step can run here, else one line saying why not. native_kernel=False asks for the
    portable build (plain C loops instead of AVX512-BF16), which the tests use on any machine."""
    if native_kernel not in _why_not:
        _why_not[native_kernel] = _check(native_kernel)
    return _why_not[native_kernel]


def _check(native_kernel: bool) -> str | None:
    if os.environ.get("EXOCORTEX_NATIVE_STEP", "1") == "0":
        return "turned off by EXOCORTEX_NATIVE_STEP=0"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"built for Linux on x86-64 only, not {sys.platform} on {platform.machine()}"
    if native_kernel and not torch.cpu._is_avx512_bf16_supported():
        return "this CPU has no AVX512-BF16"
    if _compiler() is None:
        return "no C compiler (cc, gcc or clang; or set CC)"
    if _openmp_runtime() is None:
        return "torch's OpenMP runtime (libgomp) is not loaded in this process"
    try:
        library(native_kernel)
    except Exception as e:  # noqa: BLE001 - a compiler that fails on these flags: the torch step serves
        return f"could not build cpu_step.c ({type(e).__name__}: {str(e)[:200]})"
    return None


def cache_dir() -> Path:
    root = os.environ.get("EXOCORTEX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "exocortex"))
    return Path(root) / "native"


def library(native_kernel: bool = True) -> ctypes.CDLL:
    """cpu_step.c built (once per source, compiler and flags; kept in cache_dir()) and loaded."""
    with _lock:
        if native_kernel in _libs:
            return _libs[native_kernel]
        cc, gomp = _compiler(), _openmp_runtime()
        flags = ["-O3", "-shared", "-fPIC", "-fopenmp", "-std=c11"] + (_BF16_FLAGS if native_kernel else [])
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
        key = hashlib.sha256(repr((SOURCE.read_bytes(), cc, version, flags, gomp)).encode()).hexdigest()[:20]
        path = cache_dir() / f"cpu_step-{key}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
            os.close(fd)
            try:
                # link the libgomp torch loaded: the loader then finds it already in the process
                cmd = [cc, *flags, str(SOURCE), "-o", tmp, gomp, "-lm"]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()[-400:]}")
                os.replace(tmp, path)  # atomic: a concurrent build never leaves half a library
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        lib = ctypes.CDLL(str(path))
        lib.exo_step.argtypes = [ctypes.POINTER(_Model), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        lib.exo_step.restype = ctypes.c_int
        lib.exo_native_kernel.restype = ctypes.c_int
        _libs[native_kernel] = lib
        return lib


def pack(w_t: torch.Tensor) -> torch.Tensor:
    """An (in, out) matrix as cpu_step.c reads it: [out/16][in/2][16][2] bf16, out padded to 16 and in to 2
    with zeros (pairs of inputs side by side for each of 16 outputs)."""
    n_in, n_out = w_t.shape
    pin, pout = n_in + n_in % 2, -(-n_out // 16) * 16
    padded = torch.zeros(pin, pout, dtype=torch.bfloat16)
    padded[:n_in, :n_out] = w_t
    return padded.view(pin // 2, 2, pout // 16, 16).permute(2, 0, 3, 1).contiguous()


class PackedWeights:
    """The matrices of a FusedWeights dict (rows layout: norm gains folded in) packed for cpu_step.c, and the
    float32 tensors it reads; built once per weights dict (FusedWeights.packed keeps the last one)."""

    def __init__(self, w: dict):
        self.w = w
        self.keep = []  # every tensor a pointer below points into

        def matrix(w_t: torch.Tensor) -> _Matrix:
            p = pack(w_t)
            self.keep.append(p)
            return _Matrix(p.data_ptr(), w_t.shape[0], w_t.shape[1])

        def f32(t: torch.Tensor) -> int:
            t = t.detach().float().contiguous()
            self.keep.append(t)
            return t.data_ptr()

        self.layers = [dict(qkv=matrix(L["wqkv_t"]), o=matrix(L["wo_t"]), gu=matrix(L["wgu_t"]),
                            down=matrix(L["wdown_t"]), qk_gain=f32(L["qk_gain"])) for L in w["layers"]]
        self.head = matrix(w["head_t"])
        self.embed, self.cos, self.sin = f32(w["embed"]), f32(w["cos"]), f32(w["sin"])
        self.sizes = dict(dim=w["head_t"].shape[0], vocab=w["head_t"].shape[1], ffn=w["layers"][0]["wdown_t"].shape[0],
                          max_in=max(max(t.shape[0] for t in (L["wqkv_t"], L["wo_t"], L["wgu_t"], L["wdown_t"]))
                                     for L in w["layers"]),
                          max_out=max(m.out for m in [self.head] + [L[k] for L in self.layers
                                                                    for k in ("qkv", "o", "gu", "down")]))


PREFILL_CHUNK = 32  # a prompt's tokens per step of NativeStep.prefill (at least; the scratch has a row per slot)


class NativeStep:
    """The step of one Decoder in C: the model's description for cpu_step.c (its caches, scratch for every
    row) over PackedWeights. Called as AheadOfTimeStep is: (w, k_cache, v_cache, tokens, pos, span) ->
    logits (rows, V) float32 for the first len(tokens) rows, on `threads` threads (default: the step's, which
    default to torch's thread count)."""

    def __init__(self, fused, k_cache: list, v_cache: list, n_heads: int, n_kv: int, eps: float,
                 native_kernel: bool = True, threads: int | None = None):
        self.lib = library(native_kernel)
        self.fused = fused  # the Decoder's FusedWeights: its `packed` is shared by the engine's decoders
        self.k_cache, self.v_cache = k_cache, v_cache
        self.n_heads, self.n_kv, self.eps = n_heads, n_kv, eps
        self.packed: PackedWeights | None = None
        self.threads = threads or torch.get_num_threads()

    def _ready(self, w: dict) -> None:
        if self.packed is None or self.packed.w is not w:  # new weights (an RL update): pack them once
            shared = getattr(self.fused, "packed", None)
            if shared is None or shared.w is not w:
                shared = self.fused.packed = PackedWeights(w)
            self._describe(shared)

    def _describe(self, packed: PackedWeights) -> None:
        s, (slots, kv, max_len, hd) = packed.sizes, self.k_cache[0].shape
        rows = max(slots, PREFILL_CHUNK)
        for t in self.k_cache + self.v_cache:
            if t.dtype != torch.bfloat16 or not t.is_contiguous():
                raise ValueError("the native step needs contiguous bf16 caches")
        out_stride, in_stride = s["max_out"], s["max_in"] + 2
        nq = self.n_heads + self.n_kv
        self.scratch = dict(x=torch.zeros(rows, s["dim"]), out=torch.zeros(rows, out_stride),
                            qk=torch.zeros(rows, nq * hd), att=torch.zeros(rows, self.n_heads * max_len),
                            y=torch.zeros(rows, self.n_heads * hd), scale=torch.zeros(rows),
                            xb=torch.zeros(rows, in_stride, dtype=torch.bfloat16))
        layers = (_Layer * len(packed.layers))()
        for i, L in enumerate(packed.layers):
            layers[i] = _Layer(L["qkv"], L["o"], L["gu"], L["down"], L["qk_gain"], self.k_cache[i].data_ptr(),
                               self.v_cache[i].data_ptr())
        self.layers = layers
        self.model = _Model(len(packed.layers), s["dim"], self.n_heads, self.n_kv, hd, s["ffn"], s["vocab"], max_len,
                            rows, slots, self.eps, packed.embed, packed.cos, packed.sin, packed.head, layers,
                            out_stride, in_stride, *(self.scratch[k].data_ptr() for k in _SCRATCH))
        self.vocab = s["vocab"]
        self.packed = packed

    def __call__(self, w: dict, k_cache: list, v_cache: list, tokens: torch.Tensor, pos: torch.Tensor,
                 span: int, threads: int | None = None) -> torch.Tensor:
        self._ready(w)
        n = tokens.shape[0]
        if tokens.dtype != torch.long or pos.dtype != torch.long or not pos.is_contiguous():
            raise ValueError("tokens and positions must be contiguous int64")
        if n > self.model.max_rows:
            raise ValueError(f"{n} rows in one step; at most {self.model.max_rows}")
        logits = torch.empty(n, self.vocab)  # callers may keep the logits past the next step
        _raise_for(self.lib.exo_step(ctypes.byref(self.model), n, tokens.data_ptr(), pos.data_ptr(), None, 0,
                                 logits.data_ptr(), threads or self.threads), self.model)
        return logits

    def prefill(self, w: dict, prompt: list[int], slot: int, threads: int | None = None) -> torch.Tensor:
        """A whole prompt into row `slot` of the cache from position 0 -> the last position's logits (V,) float32:
        in chunks of up to `rows` tokens (the scratch's rows), each chunk's tokens side by side in one step."""
        self._ready(w)
        rows = self.model.max_rows
        logits = torch.empty(1, self.vocab)
        for start in range(0, len(prompt), rows):
            chunk = prompt[start:start + rows]
            n = len(chunk)
            tokens = torch.tensor(chunk, dtype=torch.long)
            pos = torch.arange(start, start + n, dtype=torch.long)
            slots = torch.full((n,), slot, dtype=torch.long)
            last = start + n == len(prompt)
            _raise_for(self.lib.exo_step(ctypes.byref(self.model), n, tokens.data_ptr(), pos.data_ptr(),
                                         slots.data_ptr(), n - 1 if last else n, logits.data_ptr(),
                                         threads or self.threads), self.model)
        return logits[0]


def _raise_for(code: int, model: _Model) -> None:
    """cpu_step.c checks every index before it touches memory, and says which was out of range."""
    if code == 1:
        raise IndexError(f"a token id outside the vocabulary (0..{model.vocab - 1})")
    if code == 2:
        raise ValueError(f"a position outside the cache (0..{model.max_len - 1})")
    if code:
        raise ValueError(f"a row outside the cache (0..{model.cache_rows - 1})")
