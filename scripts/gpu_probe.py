"""GPU probe of the Triton kernels: one CSV row per measurement, written and flushed as it is measured.

Sections (--sections), in this order (the most wanted first, so that a probe stopped by its budget or a
timeout has already written them; each row is flushed before the next measurement starts). The CSV's
section column: probe (device, versions, settings), sdpa, first_call + speed, cpu_us, syncs, bwd_ab (and
fwd_ab with --ab-kinds bwd,fwd), variants, seqlens.

  sdpa       ms and TFLOP/s of SDPA (flash, cuDNN) and of rotate+SDPA (fused_posenc.apply_rotary, then
             SDPA) at the main shape (d128 bf16 causal, seqlen 4096, batch 2, 16 heads by default)
  encodings  per encoding (none rope hope fope alibi tapa, given by name): the first call's forward and
             backward seconds (compile included; cold when TRITON_CACHE_DIR starts empty: see the
             "probe" row's note), then ms and TFLOP/s of fwd and fwd+bwd; none and rope also report
             the relative error against SDPA / rotate+SDPA on the same inputs
  cpu        host microseconds per call of a small call (seqlen 128): the mean host time of many calls,
             with torch.cuda.synchronize only outside the timed loop; the ms column is the wall time per
             call up to the final synchronize (device time included)
  syncs      host-device syncs per call (one call after two warm-up calls): the value counts
             torch.cuda.set_sync_debug_mode("warn") warnings; the note adds what a TorchDispatchMode saw
             (aten._local_scalar_dense, device-to-host and host-to-device copies)
  ab         the backward config A/B: FUSED_POSENC_AUTOTUNE=0 (the first config of the pruned space) vs
             the autotuned config, ms of the backward alone, the configs chosen per kernel, and the
             largest gradient difference between the two; skipped with a note when the Triton modules
             have no autotuner to clear
  variants   rope with explicit positions
  seqlens    fwd and fwd+bwd of every encoding at the other --seqlens

Usage: python scripts/gpu_probe.py [--csv probe.csv] [--budget SECONDS] [--sections sdpa,encodings,...]
       [--seqlens 4096[,8192]] [--batch 2] [--heads 16] [--headdim 128] [--ab-encodings rope]
       [--device cpu --dtype float32 ...]  (a dry run of this script's own code under TRITON_INTERPRET=1,
                                            tiny shapes: tests/test_gpu_scripts.py runs one)

The CSV header is written before torch is imported. Without a CUDA device the probe writes the header
and one "error" row and exits with status 2. Exit status 1 if any measurement failed (its row says why),
0 otherwise; rows skipped because --budget ran out say so and do not fail the probe.
TFLOP/s use FlashAttention's count: 4 b h n^2 d per forward (half when causal), x2.5 for the backward.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import warnings

COLUMNS = ["section", "name", "mode", "batch", "seqlen", "heads", "headdim", "ms", "tflops", "value", "unit", "note"]
ENCODINGS = ["none", "rope", "hope", "fope", "alibi", "tapa"]
SECTIONS = ["sdpa", "encodings", "cpu", "syncs", "ab", "variants", "seqlens"]
MODE_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


class Rows:
    """The CSV (header at once, every row flushed) and the same rows printed as a table."""

    def __init__(self, path):
        self.fh = open(path, "w", newline="") if path else None
        self.writer = csv.DictWriter(self.fh, fieldnames=COLUMNS) if self.fh else None
        if self.writer:
            self.writer.writeheader()
            self.fh.flush()
        self.count = self.failed = self.skipped = 0

    def add(self, **kw):
        row = {c: kw.get(c, "") for c in COLUMNS}
        for c in ("ms", "tflops", "value"):
            if isinstance(row[c], float):
                row[c] = f"{row[c]:.4g}" if c != "ms" else f"{row[c]:.4f}"
        if self.writer:
            self.writer.writerow(row)
            self.fh.flush()
        self.count += 1
        shape = f"b{row['batch']} n{row['seqlen']}" if row["seqlen"] != "" else ""
        ms = f"{row['ms']} ms" if row["ms"] != "" else ""
        tf = f"{row['tflops']} TFLOP/s" if row["tflops"] != "" else ""
        val = f"{row['value']} {row['unit']}" if row["value"] != "" else ""
        print(f"{row['section']:9s} {row['name']:30s} {row['mode']:22s} {shape:12s} {ms:>13s} {tf:>15s} "
              f"{val:>18s}  {row['note']}", flush=True)

    def fail(self, exc, **kw):
        self.failed += 1
        self.add(**kw, note=f"FAILED {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")

    def skip(self, why, **kw):
        self.skipped += 1
        self.add(**kw, note=f"skipped: {why}")


class Clock:
    def __init__(self, budget):
        self.deadline = time.monotonic() + budget if budget and budget > 0 else None

    def left(self):
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def enough(self, need):
        return self.left() >= need


def tflops(b, h, n, d, mode, ms):
    return 4 * b * h * n * n * d * 0.5 * MODE_FLOPS[mode] / ms * 1e-9


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", default=None, help="write rows here (header first, flushed per row)")
    ap.add_argument("--budget", type=float, default=0, help="seconds; later cases are skipped when it is spent")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--encodings", default=",".join(ENCODINGS))
    ap.add_argument("--seqlens", default="4096", help="the first is the main shape; others: section seqlens")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--small-seqlen", type=int, default=128, help="the cpu/syncs sections' seqlen")
    ap.add_argument("--reps", type=int, default=200, help="calls per host-time measurement")
    ap.add_argument("--ab-encodings", default="rope")
    ap.add_argument("--ab-kinds", default="bwd", help="bwd and/or fwd")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a dry run of the probe's own code (tiny shapes, TRITON_INTERPRET=1, wall-clock "
                         "timing, no sync debug mode); its numbers mean nothing")
    args = ap.parse_args(argv)
    for s in args.sections.split(","):
        if s and s not in SECTIONS:
            ap.error(f"unknown section {s!r} (known: {','.join(SECTIONS)})")
    return args


def main(argv=None):
    args = parse_args(argv)
    rows = Rows(args.csv)  # the header is on disk before anything else can fail
    clock = Clock(args.budget)
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - report any broken install as a row
        rows.add(section="probe", name="error", note=f"torch is not importable: {type(e).__name__}: {e}")
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        rows.add(section="probe", name="error", note="no CUDA device (torch.cuda.is_available() is False)")
        print("gpu_probe: no CUDA device (torch.cuda.is_available() is False): nothing measured", flush=True)
        return 2
    try:
        import triton  # noqa: F401

        import fused_posenc  # noqa: F401
    except Exception as e:  # noqa: BLE001
        rows.add(section="probe", name="error", note=f"import failed: {type(e).__name__}: {e}")
        return 2
    Probe(args, rows, clock).run()
    print(f"probe: {rows.count} rows, {rows.failed} failed, {rows.skipped} skipped (budget)", flush=True)
    return 1 if rows.failed else 0


def _cache_state():
    d = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    try:
        return "cold" if not os.listdir(d) else "warm"
    except OSError:
        return "cold"


def _build_running():
    pid = os.environ.get("FIRST_CALL_BUILD_PID", "")
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
        return True
    except OSError:
        return False


def _rel_max_diff(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _cfg(c):
    kw = ",".join(f"{k}={v}" for k, v in c.kwargs.items())
    return f"{kw},w{c.num_warps},s{c.num_stages}"


class Probe:
    def __init__(self, args, rows, clock):
        import torch

        self.torch = torch
        self.args, self.rows, self.clock = args, rows, clock
        self.seqlens = [int(s) for s in args.seqlens.split(",") if s]
        self.encodings = [e for e in args.encodings.split(",") if e]
        self.b, self.h, self.d = args.batch, args.heads, args.headdim
        self.dev, self.dtype = args.device, getattr(torch, args.dtype)
        self.notes = (f"autotune={os.environ.get('FUSED_POSENC_AUTOTUNE', '1')} "
                      f"triton_cache={_cache_state()}" + (" ext-build-running" if _build_running() else ""))

    # --- inputs and callables -------------------------------------------------------------------------
    def inputs(self, b, n, seed):
        torch = self.torch
        g = torch.Generator(device=self.dev).manual_seed(seed)

        def r():
            return torch.randn(b, n, self.h, self.d, device=self.dev, dtype=self.dtype, generator=g)

        return r().requires_grad_(), r().requires_grad_(), r().requires_grad_(), r()

    @staticmethod
    def ours(enc, **kw):
        import fused_posenc as fp

        def f(q, k, v):
            return fp.fused_attention(q, k, v, enc, causal=True, backend="triton", **kw)
        return f

    def sdpa(self, backend=None):
        torch = self.torch
        F = torch.nn.functional
        if backend is None:
            def f(q, k, v):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True).transpose(1, 2)
            return f
        from torch.nn.attention import SDPBackend, sdpa_kernel

        be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]

        def g(q, k, v):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True).transpose(1, 2)
        return g

    def rotate_sdpa(self, backend=None, enc="rope"):
        import fused_posenc as fp

        attn = self.sdpa(backend)

        def f(q, k, v):
            return attn(fp.apply_rotary(q, enc), fp.apply_rotary(k, enc), v)
        return f

    # --- measurements -----------------------------------------------------------------------------------
    def sync(self):
        if self.dev == "cuda":
            self.torch.cuda.synchronize()

    def run_of(self, fn, mode, q, k, v, do):
        torch = self.torch
        if mode == "fwd":
            return lambda: fn(q, k, v)

        def run():
            out = fn(q, k, v)
            torch.autograd.grad(out, (q, k, v), do)
        return run

    def bench(self, run):
        """Median ms (triton.testing.do_bench: CUDA events, L2 flushed between runs)."""
        if self.dev != "cuda":  # dry run: the wall-clock time of one call
            t0 = time.perf_counter()
            run()
            return (time.perf_counter() - t0) * 1e3
        import triton

        return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")

    def timed_rows(self, section, name, fn, b, n, q, k, v, do, modes=("fwd", "fwd+bwd"), notes=None, soft=False):
        """One row per mode; ``soft``: a baseline that cannot run here is noted, not counted as a failure."""
        for mode in modes:
            if not self.clock.enough(5):
                self.rows.skip("probe budget spent", section=section, name=name, mode=mode, batch=b, seqlen=n)
                continue
            shape = dict(section=section, name=name, mode=mode, batch=b, seqlen=n, heads=self.h, headdim=self.d)
            try:
                ms = self.bench(self.run_of(fn, mode, q, k, v, do))
            except Exception as e:  # noqa: BLE001 - report, keep going
                if soft:
                    self.rows.add(**shape, note=f"unavailable: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
                else:
                    self.rows.fail(e, **shape)
                continue
            self.rows.add(**shape, ms=ms, tflops=tflops(b, self.h, n, self.d, mode, ms),
                          note=(notes or {}).get(mode, ""))

    def rel_err(self, a_fn, b_fn, q, k, v):
        with self.torch.no_grad():
            a, b = a_fn(q, k, v).float(), b_fn(q, k, v).float()
        return ((a - b).norm() / b.norm()).item()

    # --- sections ---------------------------------------------------------------------------------------
    def run(self):
        torch = self.torch
        import triton

        import fused_posenc as fp

        device = torch.cuda.get_device_name() if self.dev == "cuda" else "cpu (dry run: the numbers mean nothing)"
        self.rows.add(section="probe", name="device", mode=f"{self.args.dtype}", value=device,
                      note=f"torch {torch.__version__} cuda {torch.version.cuda} triton {triton.__version__} "
                           f"fused_posenc {fp.__file__} {self.notes}")
        self.main = self.inputs(self.b, self.seqlens[0], seed=0)
        for s in self.args.sections.split(","):
            if not s:
                continue
            if not self.clock.enough(5):
                self.rows.skip("probe budget spent", section=s, name="(section)")
                continue
            try:
                getattr(self, "section_" + s)()
            except Exception as e:  # noqa: BLE001 - a broken section must not lose the others
                self.rows.fail(e, section=s, name="(section)")

    def section_sdpa(self):
        b, n = self.b, self.seqlens[0]
        q, k, v, do = self.main
        for backend in ("flash", "cudnn"):
            self.timed_rows("sdpa", f"sdpa-{backend}", self.sdpa(backend), b, n, q, k, v, do, soft=True)
        self.timed_rows("sdpa", "rotate+sdpa-flash-rope", self.rotate_sdpa("flash"), b, n, q, k, v, do, soft=True)
        self.timed_rows("sdpa", "rotate+sdpa-cudnn-rope", self.rotate_sdpa("cudnn"), b, n, q, k, v, do, soft=True)

    def section_encodings(self):
        torch = self.torch
        b, n = self.b, self.seqlens[0]
        q, k, v, do = self.main
        for enc in self.encodings:
            name = f"triton-{enc}"
            base = dict(section="first_call", name=name, batch=b, seqlen=n, heads=self.h, headdim=self.d)
            if not self.clock.enough(30):
                self.rows.skip("probe budget spent", **base)
                continue
            fn = self.ours(enc)
            try:
                self.sync()
                t0 = time.perf_counter()
                out = fn(q, k, v)
                self.sync()
                t1 = time.perf_counter()
                torch.autograd.grad(out, (q, k, v), do)
                self.sync()
                t2 = time.perf_counter()
            except Exception as e:  # noqa: BLE001
                self.rows.fail(e, **base, mode="fwd+bwd")
                continue
            self.rows.add(**base, mode="fwd", value=t1 - t0, unit="s", note=self.notes)
            self.rows.add(**base, mode="bwd", value=t2 - t1, unit="s", note=self.notes)
            notes = {}
            try:
                if enc == "none":
                    notes["fwd"] = f"rel_err_vs_sdpa_flash={self.rel_err(fn, self.sdpa('flash'), q, k, v):.2e}"
                elif enc == "rope":
                    notes["fwd"] = (f"rel_err_vs_rotate+sdpa_flash="
                                    f"{self.rel_err(fn, self.rotate_sdpa('flash'), q, k, v):.2e}")
            except Exception as e:  # noqa: BLE001
                notes["fwd"] = f"rel_err FAILED {type(e).__name__}: {str(e)[:120]}"
            self.timed_rows("speed", name, fn, b, n, q, k, v, do, notes=notes)

    def host_us(self, run, reps):
        for _ in range(min(5, reps)):  # warm-up (plans, autotuner caches)
            run()
        self.sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        t1 = time.perf_counter()
        self.sync()
        t2 = time.perf_counter()
        return (t1 - t0) / reps * 1e6, (t2 - t0) / reps * 1e3

    def small_cases(self):
        """(name, fn, needs the explicit-positions kwargs) for the cpu and syncs sections."""
        import fused_posenc as fp

        n = self.args.small_seqlen
        pos = self.torch.arange(n, device=self.dev)
        cases = [(f"triton-{e}", self.ours(e)) for e in self.encodings]
        cases += [("triton-rope-instance", self.ours(fp.RoPE())),
                  ("triton-rope-positions", self.ours("rope", q_positions=pos, k_positions=pos)),
                  ("sdpa-default", self.sdpa()), ("rotate+sdpa-default-rope", self.rotate_sdpa())]
        return cases

    def small_runs(self, section, seed):
        """``(row base, mode, run)`` for every small case in fwd (under no_grad) and fwd+bwd, within the budget."""
        torch = self.torch
        b, n = self.b, self.args.small_seqlen
        q, k, v, do = self.inputs(b, n, seed=seed)
        for name, fn in self.small_cases():
            for mode in ("fwd", "fwd+bwd"):
                base = dict(section=section, name=name, mode=mode, batch=b, seqlen=n, heads=self.h, headdim=self.d)
                if not self.clock.enough(10):
                    self.rows.skip("probe budget spent", **base)
                    continue
                run = self.run_of(fn, mode, q, k, v, do)
                if mode == "fwd":
                    inner = run

                    def run(inner=inner):
                        with torch.no_grad():
                            inner()
                yield base, mode, run

    def section_cpu(self):
        for base, mode, run in self.small_runs("cpu_us", seed=1):
            try:
                us, wall_ms = self.host_us(run, self.args.reps)
            except Exception as e:  # noqa: BLE001
                self.rows.fail(e, **base)
                continue
            self.rows.add(**base, ms=wall_ms, value=us, unit="us host/call",
                          note=f"{self.args.reps} calls{' fwd under no_grad' if mode == 'fwd' else ''}; "
                               "ms = wall per call incl. device"
                               + (" ext-build-running" if _build_running() else ""))

    def count_syncs(self, run):
        torch = self.torch
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten

        class Counter(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.scalar = self.d2h = self.h2d = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                packet = getattr(func, "overloadpacket", None)
                if packet is aten._local_scalar_dense:
                    self.scalar += 1
                elif packet is aten._to_copy and args and isinstance(args[0], torch.Tensor):
                    dst = kwargs.get("device")
                    if dst is not None:
                        self.seen(args[0].device, torch.device(dst))
                elif packet is aten.copy_ and len(args) > 1 and isinstance(args[1], torch.Tensor):
                    self.seen(args[1].device, args[0].device)
                return func(*args, **kwargs)

            def seen(self, src, dst):
                if src.type == "cuda" and dst.type == "cpu":
                    self.d2h += 1
                elif src.type == "cpu" and dst.type == "cuda":
                    self.h2d += 1

        for _ in range(2 if self.dev == "cuda" else 1):  # warm-up: plans and autotuner caches
            run()
        self.sync()
        cuda = self.dev == "cuda"
        prev = torch.cuda.get_sync_debug_mode() if cuda else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with Counter() as c:
                    run()
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(prev)
        self.sync()
        warned = sum("synchroniz" in str(w.message) for w in caught)
        return warned, c

    def section_syncs(self):
        for base, mode, run in self.small_runs("syncs", seed=2):
            try:
                warned, c = self.count_syncs(run)
            except Exception as e:  # noqa: BLE001
                self.rows.fail(e, **base)
                continue
            self.rows.add(**base, value=warned, unit="sync warnings/call",
                          note=f"dispatch: local_scalar_dense={c.scalar} d2h_copies={c.d2h} h2d_copies={c.h2d}")

    def section_ab(self):
        torch = self.torch
        from triton.runtime.autotuner import Autotuner

        import fused_posenc.ops.triton.bwd as bwd_mod
        import fused_posenc.ops.triton.fwd as fwd_mod

        b, n = self.b, self.seqlens[0]
        q, k, v, do = self.main
        for kind in [x for x in self.args.ab_kinds.split(",") if x]:
            mod = {"fwd": fwd_mod, "bwd": bwd_mod}[kind]
            tuners = {name: obj for name, obj in sorted(vars(mod).items()) if isinstance(obj, Autotuner)}
            for enc in [e for e in self.args.ab_encodings.split(",") if e]:
                base = dict(section=f"{kind}_ab", name=f"triton-{enc}", batch=b, seqlen=n, heads=self.h,
                            headdim=self.d)
                if not tuners or not all(isinstance(getattr(t, "cache", None), dict) for t in tuners.values()):
                    self.rows.skip(f"{mod.__name__} has no autotuner with a cache to clear", **base, mode=kind)
                    continue
                fn = self.ours(enc)
                old = os.environ.get("FUSED_POSENC_AUTOTUNE")
                grads = {}
                try:
                    for label, value in (("first-config", "0"), ("autotuned", "1")):
                        if not self.clock.enough(45):
                            self.rows.skip("probe budget spent", **base, mode=f"{kind} {label}")
                            break
                        os.environ["FUSED_POSENC_AUTOTUNE"] = value
                        for t in tuners.values():
                            t.cache.clear()
                        try:
                            if kind == "bwd":
                                out = fn(q, k, v)
                                def run(out=out):
                                    return torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
                            else:
                                def run():
                                    return fn(q, k, v)
                            self.sync()
                            t0 = time.perf_counter()
                            res = run()
                            self.sync()
                            first_s = time.perf_counter() - t0
                            grads[label] = res if kind == "bwd" else (res,)
                            ms = self.bench(run)
                        except Exception as e:  # noqa: BLE001
                            self.rows.fail(e, **base, mode=f"{kind} {label}")
                            continue
                        chosen = " ".join(f"{name}:{_cfg(t.best_config)}" for name, t in tuners.items()
                                          if getattr(t, "best_config", None) is not None)
                        note = f"configs {chosen}; first call {first_s:.2f}s (tuning/compiles included)"
                        if label == "autotuned" and "first-config" in grads:
                            diff = max(_rel_max_diff(a, c) for a, c in zip(grads["autotuned"], grads["first-config"]))
                            note += f"; max rel diff vs first-config {diff:.2e}"
                        self.rows.add(**base, mode=f"{kind} {label}", ms=ms,
                                      tflops=tflops(b, self.h, n, self.d, kind, ms), value=first_s, unit="s first call",
                                      note=note)
                finally:
                    if old is None:
                        os.environ.pop("FUSED_POSENC_AUTOTUNE", None)
                    else:
                        os.environ["FUSED_POSENC_AUTOTUNE"] = old
                    for t in tuners.values():  # later sections choose again under the restored setting
                        t.cache.clear()

    def section_variants(self):
        b, n = self.b, self.seqlens[0]
        q, k, v, do = self.main
        pos = self.torch.arange(n, device=self.dev)
        cases = [("triton-rope-positions", self.ours("rope", q_positions=pos, k_positions=pos))]
        for name, fn in cases:
            if not self.clock.enough(30):
                self.rows.skip("probe budget spent", section="variants", name=name, batch=b, seqlen=n)
                continue
            self.timed_rows("variants", name, fn, b, n, q, k, v, do)

    def section_seqlens(self):
        for n in self.seqlens[1:]:
            q, k, v, do = self.inputs(self.b, n, seed=n)
            self.timed_rows("seqlens", "sdpa-flash", self.sdpa("flash"), self.b, n, q, k, v, do, soft=True)
            for enc in self.encodings:
                self.timed_rows("seqlens", f"triton-{enc}", self.ours(enc), self.b, n, q, k, v, do)


if __name__ == "__main__":
    sys.exit(main())
