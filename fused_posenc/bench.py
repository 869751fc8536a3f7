"""Benchmark core: shapes, FLOP counts, timing, peak memory, CSV rows, presets and the core providers.

``python -m fused_posenc.bench`` runs a quick subset with the providers that need nothing but torch
and this package. ``benchmarks/run.py`` (in the repository) is the full harness: it adds the external
providers (Liger-Kernel's RoPE, FlexAttention) and reuses everything here, so there is one timing core.

Conventions (see ``benchmarks/README.md``):

* Every provider is a function ``build(encoding, shape) -> fwd`` where ``fwd(q, k, v)`` takes the
  package layout ``(batch, seqlen, heads, headdim)`` and returns ``(batch, seqlen, heads, headdim_v)``
  (a view is fine); it raises :class:`Skip` with a reason when it cannot run the call.
* Modes: ``fwd`` (training forward: inputs require grad, autograd records), ``bwd`` (backward of a
  retained graph), ``fwd+bwd``. Inputs are ``NSETS`` independent q/k/v sets allocated up front and
  cycled, so that no call sees the previous call's data in cache.
* FLOPs (FlashAttention's convention, the same for every encoding and provider):
  ``4 * batch * nheads * seqlen^2 * headdim``, halved when causal, x2.5 for ``bwd``, x3.5 for ``fwd+bwd``.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import itertools
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterable, List, Optional

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
ENCODINGS = ("none", "rope", "hope", "fope", "alibi", "tapa")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
CSV_FIELDS = ("kernel", "provider", "mode", "metric", "unit", "x", "p50", "p20", "p80", "config", "gpu", "torch",
              "triton", "commit")
NSETS = 3
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


class Skip(Exception):
    """A provider cannot run this (encoding, shape, mode); the message says why."""


# ----------------------------------------------------------------------------------------------
# shapes and FLOPs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    batch: int
    seqlen: int
    nheads: int
    headdim: int
    causal: bool
    dtype: str  # key of DTYPES
    device: str = "cuda"
    nheads_kv: Optional[int] = None

    @property
    def hkv(self) -> int:
        return self.nheads if self.nheads_kv is None else self.nheads_kv

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def config(self) -> str:
        """The CSV ``config`` column: ``key=value`` pairs joined by ``;`` (see :func:`parse_config`)."""
        return (f"batch={self.batch};seqlen={self.seqlen};nheads={self.nheads};nheads_kv={self.hkv};"
                f"headdim={self.headdim};causal={int(self.causal)};dtype={self.dtype}")


def parse_config(s: str) -> dict:
    out = {}
    for part in s.split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = int(v) if v.lstrip("-").isdigit() else v
    return out


def flops(shape: Shape, mode: str) -> float:
    """FlashAttention's count: ``4 B H N^2 D`` (/2 causal), x2.5 bwd, x3.5 fwd+bwd."""
    f = 4.0 * shape.batch * shape.nheads * shape.seqlen * shape.seqlen * shape.headdim
    if shape.causal:
        f /= 2
    return f * MODE_FLOP_FACTOR[mode]


def tokens_shape(seqlen: int, tokens: int, headdim: int, causal: bool, dtype: str, device: str,
                 model_dim: int = 2048, nheads_kv: Optional[int] = None) -> Shape:
    """``batch = max(1, tokens // seqlen)``, ``nheads = model_dim // headdim`` (FlashAttention's sweep)."""
    return Shape(max(1, tokens // seqlen), seqlen, model_dim // headdim, headdim, causal, dtype, device, nheads_kv)


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def make_inputs(shape: Shape, nsets: int = NSETS, seed: int = 0) -> List[tuple]:
    """``nsets`` independent ``(q, k, v)`` triples (leaf tensors requiring grad), package layout."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    sets = []
    for _ in range(nsets):
        def r(h):
            if shape.device.startswith("cuda"):
                t = torch.randn(shape.batch, shape.seqlen, h, shape.headdim, device=shape.device,
                                dtype=shape.torch_dtype, generator=torch.Generator(device=shape.device).manual_seed(
                                    int(torch.randint(0, 2**31 - 1, (1,), generator=g))))
            else:
                t = torch.randn(shape.batch, shape.seqlen, h, shape.headdim, generator=g,
                                dtype=torch.float32).to(shape.torch_dtype)
            return t.requires_grad_(True)
        sets.append((r(shape.nheads), r(shape.hkv), r(shape.hkv)))
    return sets


# ----------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _quantiles(samples: List[float]) -> tuple:
    s = sorted(samples)

    def q(p):
        if len(s) == 1:
            return s[0]
        x = p * (len(s) - 1)
        lo = int(math.floor(x))
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)

    return q(0.5), q(0.2), q(0.8)


@dataclass
class TimingOptions:
    warmup_ms: float = 25.0  # CUDA: triton.testing.do_bench's warm-up
    rep_ms: float = 100.0  # CUDA: do_bench's measuring time
    cpu_repeats: int = 5  # CPU: timed calls after one warm-up call (at least this many)
    cpu_warmup: int = 1
    cpu_min_s: float = 0.0  # CPU: keep timing calls until they add up to at least this many seconds
    cpu_max_s: float = math.inf  # CPU: ... but stop once the timed calls add up to this many (>= 1 call)


def time_step(step: Callable[[], None], device: str, opts: TimingOptions = TimingOptions()) -> tuple:
    """Milliseconds per call ``(p50, p20, p80)``; warm-up excluded.

    CUDA: ``triton.testing.do_bench`` (median and quantiles; it also flushes L2 between calls), or CUDA
    events when Triton is missing. CPU: ``time.perf_counter`` around each call, after ``cpu_warmup``
    calls, until there are at least ``cpu_repeats`` calls and they add up to at least ``cpu_min_s``, or
    they add up to ``cpu_max_s`` (a bound on a slow or busy machine).
    """
    if device.startswith("cuda"):
        try:
            from triton.testing import do_bench
        except Exception:  # no Triton: CUDA events
            do_bench = None
        if do_bench is not None:
            r = do_bench(step, warmup=opts.warmup_ms, rep=opts.rep_ms, quantiles=[0.5, 0.2, 0.8])
            return tuple(float(x) for x in r)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        samples = []
        n = 20
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            samples.append(a.elapsed_time(b))
        return _quantiles(samples)
    for _ in range(opts.cpu_warmup):
        step()
    samples = []
    total = 0.0
    while (len(samples) < opts.cpu_repeats or total < opts.cpu_min_s * 1e3) and (
            not samples or total < opts.cpu_max_s * 1e3):
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1e3)
        total += samples[-1]
    return _quantiles(samples)


def peak_memory_mib(step: Callable[[], None], device: str) -> Optional[float]:
    """Extra memory one call allocates at its peak, over what is allocated before it (MiB); ``None`` on CPU."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def make_step(fwd: Callable, sets: List[tuple], mode: str) -> Callable[[], None]:
    """A no-argument callable running one ``mode`` call, cycling through the input sets.

    ``bwd`` builds one retained graph per set up front and times ``torch.autograd.grad`` on it
    (``retain_graph=True``); gradients are returned, never accumulated into ``.grad``.
    """
    idx = itertools.cycle(range(len(sets)))
    if mode == "fwd":
        def step():
            q, k, v = sets[next(idx)]
            fwd(q, k, v)
        return step
    graphs = []
    for q, k, v in sets:
        do = torch.randn(q.shape[:-1] + v.shape[-1:], device=q.device, dtype=q.dtype)
        graphs.append((fwd(q, k, v) if mode == "bwd" else None, do, (q, k, v)))
    if mode == "bwd":
        def step():
            out, do, leaves = graphs[next(idx)]
            torch.autograd.grad(out, leaves, do, retain_graph=True)
        return step
    if mode == "fwd+bwd":
        def step():
            _, do, leaves = graphs[next(idx)]
            out = fwd(*leaves)
            torch.autograd.grad(out, leaves, do)
        return step
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    """``gpu`` (device name, or ``cpu``), ``torch``, ``triton`` and ``commit`` columns."""
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
    else:
        gpu = "cpu"
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "n/a"
    commit = os.environ.get("FUSED_POSENC_COMMIT", "")
    if not commit:
        try:
            here = os.path.dirname(os.path.abspath(__file__))
            commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            if commit and dirty:
                commit += "-dirty"
        except Exception:
            commit = ""
    return {"gpu": gpu, "torch": torch.__version__, "triton": tv, "commit": commit or "unknown"}


# ----------------------------------------------------------------------------------------------
# core providers (need only torch and this package)
# ----------------------------------------------------------------------------------------------
ProviderFn = Callable[[str, Shape], Callable]


@dataclass
class Provider:
    name: str
    build: ProviderFn
    encodings: tuple = ENCODINGS
    doc: str = ""


def _encoding(name: str, shape: Shape):
    """The same encoding object ``fused_attention(encoding=name)`` uses (FoPE: the cached default)."""
    from .attention import resolve_encoding

    return resolve_encoding(name, shape.headdim, shape.nheads)


def ours(backend: str) -> ProviderFn:
    """``fused_attention(..., backend=backend)``; the ``none`` kernel of a backend is its ceiling."""

    def build(encoding: str, shape: Shape):
        from .attention import fused_attention, prepare
        from .backends import get_backend

        if backend == "triton" and not shape.device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
            raise Skip("triton on CPU tensors needs TRITON_INTERPRET=1")
        try:
            b = get_backend(backend)
            ok, why = b.available()
        except Exception as e:  # backend module missing or broken
            ok, why = False, f"{type(e).__name__}: {e}"
        if not ok:
            raise Skip(f"backend {backend!r} unavailable: {why}")
        enc = _encoding(encoding, shape)
        q = torch.empty(shape.batch, shape.seqlen, shape.nheads, shape.headdim, device=shape.device,
                        dtype=shape.torch_dtype)
        k = torch.empty(shape.batch, shape.seqlen, shape.hkv, shape.headdim, device=shape.device,
                        dtype=shape.torch_dtype)
        ok, why = b.supports(prepare(q, k, k, enc, shape.causal, None, None, None))
        if not ok:
            raise Skip(f"backend {backend!r} does not support this call: {why}")
        causal = shape.causal

        def fwd(q, k, v):
            return fused_attention(q, k, v, enc, causal=causal, backend=backend)

        return fwd

    return build


_SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                  "math": "MATH"}


def _guard_scores(shape: Shape, copies: float, what: str) -> None:
    """Skip a provider that materialises ``copies`` float32 ``(B, H, L, L)`` tensors that would not fit."""
    need = shape.batch * shape.nheads * shape.seqlen ** 2 * 4.0 * copies
    if shape.device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        limit = 0.8 * free
    else:
        limit = float(os.environ.get("FUSED_POSENC_BENCH_CPU_LIMIT_GB", "4")) * 2**30
    if need > limit:
        raise Skip(f"{what} would materialise ~{need / 2**30:.1f} GiB of scores (limit {limit / 2**30:.1f} GiB)")


def sdpa_call(backend: str, shape: Shape, bias: Optional[torch.Tensor] = None, expand_kv: bool = False) -> Callable:
    """``fn(q, k, v)`` in the package layout -> SDPA pinned to ``backend`` in (B, H, L, D) -> package layout.

    ``backend="default"``: PyTorch's own kernel choice (no pinning). GQA: ``enable_gqa=True``, or with
    ``expand_kv`` the kv heads repeated to the query heads first (``repeat_kv`` in transformers)."""
    import contextlib

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = None if backend == "default" else getattr(SDPBackend, _SDPA_BACKENDS[backend])
    gqa = shape.hkv != shape.nheads
    group = shape.nheads // shape.hkv
    causal = shape.causal and bias is None

    def fn(q, k, v):
        kw = {}
        if gqa and expand_kv:
            if k.shape[2] != q.shape[2]:
                k = k.repeat_interleave(group, dim=2)
            if v.shape[2] != q.shape[2]:
                v = v.repeat_interleave(group, dim=2)
        elif gqa:
            kw["enable_gqa"] = True
        with sdpa_kernel(kind) if kind is not None else contextlib.nullcontext():
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=bias, is_causal=causal, **kw)
        return o.transpose(1, 2)

    return fn


def _probe(factory: Callable[[Shape], Callable], shape: Shape, what: str) -> None:
    """Build the provider for a tiny shape of the same kind and run it forward and backward once, to turn
    "no kernel for these inputs" (e.g. a pinned SDPA backend that cannot run them) into :class:`Skip`."""
    tiny = replace(shape, batch=1, seqlen=min(shape.seqlen, 128))
    q, k, v = make_inputs(tiny, 1)[0]
    try:
        out = factory(tiny)(q, k, v)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    except Skip:
        raise
    except Exception as e:
        raise Skip(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")


def alibi_bias(shape: Shape) -> torch.Tensor:
    """``(1, H, L, L)`` additive bias in the input dtype: ``-slope_h |m - n|``, ``-inf`` above the diagonal
    if causal. Built one head at a time so the float32 temporaries stay ``(L, L)``."""
    from .encodings import ALiBi

    slopes = ALiBi().slopes(shape.nheads, 1, shape.device)[0]  # (H,) float32, the encoding's own slopes
    pos = torch.arange(shape.seqlen, device=shape.device)
    dist = (pos[:, None] - pos[None, :]).abs().to(torch.float32)
    above = pos[None, :] > pos[:, None]
    bias = torch.empty(1, shape.nheads, shape.seqlen, shape.seqlen, device=shape.device, dtype=shape.torch_dtype)
    for h in range(shape.nheads):
        b = -slopes[h] * dist
        if shape.causal:
            b = b.masked_fill(above, float("-inf"))
        bias[0, h] = b
    return bias


def sdpa(backend: str, expand_kv: bool = False) -> ProviderFn:
    """SDPA pinned to one backend: plain attention (``none``) and ALiBi as a materialised additive bias."""

    def build(encoding: str, shape: Shape):
        if encoding == "none":
            def factory(s):
                return sdpa_call(backend, s, expand_kv=expand_kv)
        elif encoding == "alibi":
            # the (1, H, L, L) bias, its (L, L) float32 temporaries, and room for the kernel
            need = shape.nheads * shape.seqlen ** 2 * shape.torch_dtype.itemsize + 3 * 4.0 * shape.seqlen ** 2
            if need > (0.5 * torch.cuda.mem_get_info()[0] if shape.device.startswith("cuda") else 2**31):
                raise Skip(f"the ALiBi bias would need ~{need / 2**30:.1f} GiB")

            def factory(s):
                return sdpa_call(backend, s, alibi_bias(s), expand_kv=expand_kv)
        else:
            raise Skip("SDPA has no hook for this encoding (see rotate+sdpa-*)")
        _probe(factory, shape, f"sdpa-{backend}")
        return factory(shape)

    return build


def rotate_sdpa(backend: str, expand_kv: bool = False) -> ProviderFn:
    """The unfused baseline: ``apply_rotary`` on q and k (tables computed in the call), then SDPA.

    ``expand_kv`` (GQA): k and v repeated to the query heads, after rotating k (transformers' order), or
    before when the tables differ per query head (a per-head FoPE)."""

    def build(encoding: str, shape: Shape):
        from .rotary import apply_rotary

        enc = _encoding(encoding, shape)
        if not enc.is_rotation:
            raise Skip("not a rotation encoding")
        group = shape.nheads // shape.hkv
        expand_first = expand_kv and group > 1 and getattr(enc, "num_heads", 1) not in (1, shape.hkv)

        def factory(s):
            inner = sdpa_call(backend, s, expand_kv=expand_kv)

            def fn(q, k, v):
                if expand_first:
                    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
                return inner(apply_rotary(q, enc), apply_rotary(k, enc), v)

            return fn

        _probe(factory, shape, f"rotate+sdpa-{backend}")
        return factory(shape)

    return build


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def fope_authors(encoding: str, shape: Shape):
    """FoPE as the authors' code computes it: einsum the Fourier tables (per call, per head), apply them
    with ``x*C + rotate_half(x)*S`` in float32, then SDPA (default backend choice)."""
    import torch.nn.functional as F

    if encoding != "fope":
        raise Skip("FoPE only")
    enc = _encoding("fope", shape)
    if shape.hkv != shape.nheads:
        raise Skip("the authors' formulation assumes nheads_kv == nheads")
    pos = torch.arange(shape.seqlen, device=shape.device)[None]
    enc = enc.to(shape.device)
    causal = shape.causal

    def fn(q, k, v):
        c, s = enc.tables(pos, shape.headdim, shape.nheads, shape.hkv, torch.float32)  # (1, L, H, D/2)
        c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)
        qf, kf = q.float(), k.float()
        qr = (qf * c + _rotate_half(qf) * s).to(q.dtype)
        kr = (kf * c + _rotate_half(kf) * s).to(k.dtype)
        o = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=causal)
        return o.transpose(1, 2)

    return fn


def reference(encoding: str, shape: Shape):
    """``reference_attention``: the materialised PyTorch formulation (TAPA's only PyTorch baseline)."""
    from .attention import reference_attention

    _guard_scores(shape, 12, "reference_attention")
    enc = _encoding(encoding, shape)
    causal = shape.causal

    def fn(q, k, v):
        return reference_attention(q, k, v, enc, causal=causal)

    return fn


# absolute floors of the accuracy idiom, per dtype (the reference in the input dtype can be near-exact)
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check_provider(prov: Provider, encoding: str, shape: Shape, seed: int = 1) -> Dict[str, tuple]:
    """``{"out"|"dq"|"dk"|"dv": (error, reference error)}``: max abs error of a provider's output and
    gradients against the float64 ``reference_attention``, and that of the reference run in the input
    dtype (FlashAttention's idiom: a provider is right if ``error <= 2 * reference error + FLOOR``).
    Checks that every provider computes the same function. Raises :class:`Skip` like ``build``."""
    from .attention import reference_attention

    fwd = prov.build(encoding, shape)
    q, k, v = make_inputs(shape, 1, seed)[0]
    do = torch.randn(q.shape[:-1] + v.shape[-1:], generator=torch.Generator().manual_seed(seed)).to(q)
    enc = _encoding(encoding, shape)

    def run(f, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = f(*leaves)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, do.to(dtype)))

    def ref(a, b, c):
        return reference_attention(a, b, c, enc, causal=shape.causal)

    r64 = run(ref, torch.float64)
    rlp = run(ref, q.dtype)
    test = run(fwd, q.dtype)
    return {name: ((t.double() - r).abs().max().item(), (l.double() - r).abs().max().item())
            for name, t, l, r in zip(("out", "dq", "dk", "dv"), test, rlp, r64)}


def check_ok(errs: Dict[str, tuple], dtype: torch.dtype, factor: float = 2.0) -> bool:
    return all(e <= factor * r + FLOOR[dtype] for e, r in errs.values())


def core_providers() -> Dict[str, Provider]:
    p = {}
    for b in ("triton", "cuda", "cpu"):
        p[f"ours-{b}"] = Provider(f"ours-{b}", ours(b), ENCODINGS, f"fused_attention(backend={b!r})")
    for b in _SDPA_BACKENDS:
        p[f"sdpa-{b}"] = Provider(f"sdpa-{b}", sdpa(b), ("none", "alibi"), f"SDPA pinned to {b}")
        p[f"rotate+sdpa-{b}"] = Provider(f"rotate+sdpa-{b}", rotate_sdpa(b), ("rope", "hope", "fope"),
                                         f"apply_rotary then SDPA[{b}]")
    p["fope-authors"] = Provider("fope-authors", fope_authors, ("fope",), "FoPE tables by einsum, then SDPA")
    p["reference"] = Provider("reference", reference, ENCODINGS, "reference_attention (materialised)")
    return p


# ----------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------
@dataclass
class Sweep:
    shapes: List[Shape]
    encodings: tuple
    modes: tuple
    providers: tuple  # names or globs


def presets() -> Dict[str, List[Sweep]]:
    """Named lists of sweeps, run in order (cheap, robust sweeps first: ``--time-budget`` cuts the tail)."""
    gpu_main = ("ours-triton", "ours-cuda", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "rotate+sdpa-flash",
                "rotate+sdpa-cudnn", "liger+sdpa-flash", "liger+sdpa-cudnn", "fope-authors")
    quick_shapes = [tokens_shape(n, 16384, 128, True, "bf16", "cuda") for n in (1024, 2048, 4096, 8192, 16384)]
    full_shapes = [tokens_shape(n, max(16384, n), d, c, dt, "cuda")
                   for dt in ("bf16", "fp16") for d in (128, 64) for c in (True, False)
                   for n in (512, 1024, 2048, 4096, 8192, 16384, 32768)]
    cpu_shapes = [Shape(2, n, 2, 32, True, "fp32", "cpu") for n in (64, 128)]
    quick_modes = ("fwd", "fwd+bwd")
    return {
        "cpu-tiny": [Sweep(cpu_shapes, ENCODINGS, MODES,
                           ("ours-cpu", "ours-triton", "sdpa-math", "sdpa-flash", "rotate+sdpa-math",
                            "liger+sdpa-math", "fope-authors", "reference"))],
        "gpu-quick": [
            Sweep(quick_shapes, ENCODINGS, quick_modes, gpu_main),
            # TAPA's target is at 32k: our kernels only (nothing else fits 32k x 32k scores)
            Sweep([tokens_shape(32768, 32768, 128, True, "bf16", "cuda")], ("none", "tapa"), ("fwd+bwd",),
                  ("ours-triton", "ours-cuda")),
            # compiled / materialising baselines last: compile time and memory are the risky part
            Sweep(quick_shapes, ("alibi", "tapa"), quick_modes, ("flex",)),
            Sweep(quick_shapes, ("tapa",), quick_modes, ("reference",)),
        ],
        "gpu-full": [Sweep(full_shapes, ENCODINGS, MODES, gpu_main + ("rotate+sdpa-efficient", "liger+sdpa-efficient")),
                     Sweep(full_shapes, ("none", "alibi", "tapa"), MODES, ("flex",)),
                     Sweep(full_shapes, ("fope", "alibi", "tapa"), MODES, ("reference",))],
    }


# ----------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------
def _match(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class Runner:
    """Runs sweeps, appending CSV rows to ``out`` as they come (a killed run keeps what it measured)."""

    def __init__(self, providers: Dict[str, Provider], out: Optional[str] = None, append: bool = False,
                 timing: TimingOptions = TimingOptions(), time_budget_s: Optional[float] = None,
                 verbose: bool = True, check: bool = False):
        self.check = check
        self._checked: set = set()
        self.providers = providers
        self.out = out
        self.timing = timing
        self.deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
        self.verbose = verbose
        self.rows: List[dict] = []
        self.skips: List[str] = []
        self._env: Dict[str, dict] = {}
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            new = not append or not os.path.exists(out)
            self._fh = open(out, "w" if new else "a", newline="")
            self._csv = csv.DictWriter(self._fh, CSV_FIELDS)
            if new:
                self._csv.writeheader()
            self._skipfh = open(out + ".skips.txt", "w" if new else "a")
        else:
            self._fh = self._csv = self._skipfh = None

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    def close(self) -> None:
        for fh in (self._fh, self._skipfh):
            if fh:
                fh.close()

    def _skip(self, encoding, provider, shape, mode, why) -> None:
        line = f"skip {provider} {encoding} {mode or '*'} {shape.config()}: {why}"
        self.skips.append(line)
        self.log("  " + line)
        if self._skipfh:
            self._skipfh.write(line + "\n")
            self._skipfh.flush()

    def _emit(self, row: dict) -> None:
        self.rows.append(row)
        if self._csv:
            self._csv.writerow(row)
            self._fh.flush()

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def run(self, sweeps: List[Sweep], encodings=None, providers=None, modes=None, seqlens=None) -> List[dict]:
        for sw in sweeps:
            for shape in sw.shapes:
                if seqlens and shape.seqlen not in seqlens:
                    continue
                sets = None
                for enc in sw.encodings:
                    if encodings and enc not in encodings:
                        continue
                    for pname, prov in self.providers.items():
                        if not _match(pname, sw.providers) or (providers and not _match(pname, providers)):
                            continue
                        if enc not in prov.encodings:
                            continue
                        if self.out_of_time():
                            self.log("time budget spent: stopping")
                            return self.rows
                        if sets is None:
                            sets = make_inputs(shape)
                        self._one(prov, enc, shape, [m for m in sw.modes if not modes or m in modes], sets)
                del sets
                if shape.device.startswith("cuda"):
                    torch.cuda.empty_cache()
        return self.rows

    def _one(self, prov: Provider, enc: str, shape: Shape, modes: List[str], sets) -> None:
        env = self._env.setdefault(shape.device, environment(shape.device))
        try:
            fwd = prov.build(enc, shape)
        except Skip as e:
            self._skip(enc, prov.name, shape, None, str(e))
            return
        except Exception as e:
            self._skip(enc, prov.name, shape, None, f"build failed: {type(e).__name__}: {e}")
            return
        key = (prov.name, enc, shape.headdim, shape.causal, shape.dtype)
        if self.check and key not in self._checked:
            self._checked.add(key)
            tiny = replace(shape, batch=1, seqlen=min(shape.seqlen, 256))
            try:
                errs = check_provider(prov, enc, tiny)
                ok = check_ok(errs, tiny.torch_dtype)
                detail = ", ".join(f"{n} {e:.1e} (ref {r:.1e})" for n, (e, r) in errs.items())
                line = f"check {'ok' if ok else 'MISMATCH'} {prov.name} {enc} {tiny.config()}: {detail}"
            except Exception as e:
                line = f"check failed {prov.name} {enc} {tiny.config()}: {type(e).__name__}: {e}"
            self.log("  " + line)
            if self._skipfh:
                self._skipfh.write(line + "\n")
                self._skipfh.flush()
        for mode in modes:
            if self.out_of_time():
                return
            try:
                step = make_step(fwd, sets, mode)
                ms = time_step(step, shape.device, self.timing)
                mem = peak_memory_mib(step, shape.device)
                del step
            except Skip as e:
                self._skip(enc, prov.name, shape, mode, str(e))
                continue
            except Exception as e:  # OOM, NotImplementedError, a kernel that fails: record, go on
                msg = str(e).splitlines()[0][:200] if str(e) else ""
                self._skip(enc, prov.name, shape, mode, f"{type(e).__name__}: {msg}")
                if shape.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            f = flops(shape, mode)
            base = {"kernel": enc, "provider": prov.name, "mode": mode, "x": shape.seqlen, "config": shape.config(),
                    **env}
            self._emit({**base, "metric": "time", "unit": "ms", "p50": f"{ms[0]:.6g}", "p20": f"{ms[1]:.6g}",
                        "p80": f"{ms[2]:.6g}"})
            self._emit({**base, "metric": "throughput", "unit": "TFLOP/s", "p50": f"{f / ms[0] * 1e-9:.6g}",
                        "p20": f"{f / ms[2] * 1e-9:.6g}", "p80": f"{f / ms[1] * 1e-9:.6g}"})
            m = "n/a" if mem is None else f"{mem:.6g}"
            self._emit({**base, "metric": "peak_mem", "unit": "MiB", "p50": m, "p20": m, "p80": m})
            self.log(f"  {prov.name:20s} {enc:5s} {mode:7s} L={shape.seqlen:<6d} {ms[0]:9.3f} ms "
                     f"{f / ms[0] * 1e-9:8.2f} TFLOP/s  mem {m} MiB")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_arg_parser(prog: str, default_preset: Optional[str] = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Benchmark fused_posenc against its baselines.")
    ap.add_argument("--preset", choices=sorted(presets()), default=default_preset,
                    help="cpu-tiny (seconds on CPU), gpu-quick (< 6 min on an H100), gpu-full")
    ap.add_argument("--out", help="CSV file to write (long format; skips go to OUT.skips.txt)")
    ap.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    ap.add_argument("--encodings", nargs="*", help=f"subset of {ENCODINGS}")
    ap.add_argument("--providers", nargs="*", help="provider names or globs (e.g. 'ours-*' 'sdpa-*')")
    ap.add_argument("--modes", nargs="*", choices=MODES)
    ap.add_argument("--seqlens", nargs="*", type=int)
    ap.add_argument("--time-budget", type=float, help="stop (keeping the rows so far) after this many seconds")
    ap.add_argument("--warmup-ms", type=float, default=25.0)
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--cpu-repeats", type=int, default=5)
    ap.add_argument("--check", action="store_true",
                    help="first compare each (provider, encoding) with the float64 reference on a small shape "
                         "(lines 'check ok/MISMATCH' in the log and OUT.skips.txt)")
    ap.add_argument("--list", action="store_true", help="list providers and presets, then exit")
    ap.add_argument("-q", "--quiet", action="store_true")
    return ap


def main(argv=None, providers: Optional[Dict[str, Provider]] = None, prog: str = "python -m fused_posenc.bench") -> int:
    providers = core_providers() if providers is None else providers
    ap = build_arg_parser(prog, "gpu-quick" if default_device() == "cuda" else "cpu-tiny")
    args = ap.parse_args(argv)
    if args.list:
        for name, p in providers.items():
            print(f"{name:22s} {','.join(p.encodings):36s} {p.doc}")
        for name, sweeps in presets().items():
            print(f"preset {name}: {sum(len(s.shapes) for s in sweeps)} shapes")
        return 0
    sweeps = presets()[args.preset]
    if args.preset.startswith("gpu") and not torch.cuda.is_available():
        print(f"preset {args.preset} needs a CUDA device; use --preset cpu-tiny", file=sys.stderr)
        return 2
    runner = Runner(providers, args.out, args.append,
                    TimingOptions(args.warmup_ms, args.rep_ms, args.cpu_repeats), args.time_budget,
                    verbose=not args.quiet, check=args.check)
    env = environment(sweeps[0].shapes[0].device)
    print(f"device: {env['gpu']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}", flush=True)
    t0 = time.monotonic()
    try:
        rows = runner.run(sweeps, args.encodings, args.providers, args.modes, args.seqlens)
    finally:
        runner.close()
    print(f"{len(rows)} rows, {len(runner.skips)} skips in {time.monotonic() - t0:.1f} s"
          + (f" -> {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
