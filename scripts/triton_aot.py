"""Compile the Triton kernels ahead of time for an NVIDIA target, no GPU needed (Triton's own
compiler pipeline down to a cubin through ptxas). It proves that every kernel variant lowers for
real hardware, and reports each variant's shared memory, registers and spills (``ptxas -v``).

    python scripts/triton_aot.py                      # sm_90: every variant, head dims 64/128/256, every config
    python scripts/triton_aot.py --quick --arch 80    # the first (preferred) config of each variant
    python scripts/triton_aot.py --ptxas --csv out.csv   # + registers and spills per variant

Exit status 1 if any variant fails to compile or a variant has no config that fits the target's
shared memory. Runs with ``TRITON_INTERPRET`` unset (the interpreter has no compiler).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_posenc.ops.triton import bwd, fwd, rotate, tuning  # noqa: E402
from fused_posenc.ops.triton.plan import pow2  # noqa: E402

SMEM_LIMIT = {80: 166912, 90: 232448}  # opt-in shared memory per block (bytes): A100, H100/H200
TL_DTYPE = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
TORCH_KEY = {"fp16": "torch.float16", "bf16": "torch.bfloat16", "fp32": "torch.float32"}
FP32_PTRS = {"LSE", "DELTA", "DSLOPE", "FSCALE", "TC", "TS", "SLOPES", "DCK", "DSK", "DCQ", "DSQ"}
I64_PTRS = {"QPOS", "KPOS", "POS", "FREQ"}  # FREQ: 64-bit turn fractions
I32_PTRS = {"IDX1", "IDX2", "BOUNDS"}  # BOUNDS: causal tile bounds (ops/triton/bounds.py)
IO_PTRS = {"Q", "K", "V", "O", "DO", "DK", "DV_OUT", "DQ", "X", "Y"}
FLOATS = {"scale", "phase", "alpha"}
# (name, ENC code, constexpr overrides) as the launchers pass them: GATHER = interleaved / partial rotary,
# FOPE_GRAD = learnable FoPE, INLINE = streaming operand rotated per tile (FUSED_POSENC_ROTATE_STREAM=inline),
# explicit = caller-given positions (no block skipping), non-causal
EXPLICIT = {"CAUSAL": False, "DEFAULT_POS": False}
ENCODINGS = [("none", 0, {}), ("rope", 1, {}), ("rope-gather", 1, {"GATHER": True}), ("rope-inline", 1, {"INLINE": True}),
             ("rope-explicit", 1, EXPLICIT), ("fope", 2, {}), ("fope-learnable", 2, {"FOPE_GRAD": True}),
             ("alibi", 3, {}), ("alibi-explicit", 3, EXPLICIT), ("alibi-learnable", 3, {"SLOPE_GRAD": True}), ("tapa", 4, {}), ("tapa-explicit", 4, EXPLICIT)]


def signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for p in fn.params:
        n = p.name
        if p.is_constexpr:
            sig[n] = "constexpr"
        elif n in IO_PTRS:
            sig[n] = "*" + TL_DTYPE[dtype]
        elif n in FP32_PTRS:
            sig[n] = "*fp32"
        elif n in I64_PTRS:
            sig[n] = "*i64"
        elif n in I32_PTRS:
            sig[n] = "*i32"
        elif n in FLOATS:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise KeyError(f"{fn.__name__}: no value for constexpr(s) {missing}")
    return sig


def parts(enc: int, d: int) -> tuple[int, int]:
    """Part widths as plan.make_plan chooses them (TAPA: the default theta_split 0.5)."""
    if enc in (1, 2):
        return d // 2, d // 2
    if enc == 4:
        return d // 2, d - d // 2
    p1 = max(d // 2, 1) if d <= 16 else 1 << ((d - 1).bit_length() - 1)
    return p1, d - p1


def variants(quick: bool, dims, dtypes):
    """(kernel label, JITFunction, dtype, constexprs, [(config constexprs, warps, stages)])."""
    for (name, enc, extra), dtype, d in itertools.product(ENCODINGS, dtypes, dims):
        p1, p2 = parts(enc, d)
        base = dict(ENC=enc, CAUSAL=True, DEFAULT_POS=True, GATHER=False, PREC="ieee" if dtype == "fp32" else "tf32",
                    DTYPE_KEY=TORCH_KEY[dtype], FAST=True, BLOCK_P1=pow2(p1), BLOCK_P2=pow2(p2), BLOCK_DV=pow2(d))
        base.update({k: v for k, v in extra.items() if k not in ("FOPE_GRAD", "INLINE", "SLOPE_GRAD")})
        stream = enc not in (1, 2) or extra.get("INLINE", False)  # autograd.py: rotate the streaming side inline
        fope_grad = extra.get("FOPE_GRAD", False)
        for kname, autotuned, names, more in (
                ("fwd", fwd.attn_fwd_kernel, ("BLOCK_M", "BLOCK_N"), {"ROTATE_K": stream}),
                ("bwd_dkdv", bwd.attn_bwd_dkdv_kernel, ("BLOCK_N", "BLOCK_M"),
                 {"ROTATE_STREAM": stream, "FOPE_GRAD": fope_grad}),
                ("bwd_dq", bwd.attn_bwd_dq_kernel, ("BLOCK_M", "BLOCK_N"),
                 {"ROTATE_STREAM": stream, "FOPE_GRAD": fope_grad, "SLOPE_GRAD": extra.get("SLOPE_GRAD", False)})):
            cx = {**base, **more}
            prune = tuning.pruner("fwd" if kname == "fwd" else "bwd", names)["early_config_prune"]
            pruned = prune(autotuned.configs, cx)
            cfgs = [({names[0]: c.kwargs[names[0]], names[1]: c.kwargs[names[1]]}, c.num_warps, c.num_stages)
                    for c in pruned]
            if quick:
                cfgs = cfgs[:1]
            yield f"{kname}:{name}:{dtype}:d{d}", autotuned.fn, dtype, cx, cfgs
        if enc in (1, 2) and not stream:
            cx = dict(ENC=enc, DEFAULT_POS=base["DEFAULT_POS"], GATHER=base["GATHER"],
                      BLOCK_T=rotate.rotate_block_t(4096, pow2(d // 2)), BLOCK_P=pow2(d // 2))
            yield f"rotate:{name}:{dtype}:d{d}", rotate.rotate_fwd_kernel, dtype, cx, [({}, 4, 1)]
    for dtype in dtypes:
        yield (f"bwd_preprocess:{dtype}", bwd.attn_bwd_preprocess_kernel, dtype, dict(BLOCK_DV=128),
               [({"BLOCK_M": 64}, 4, 1)])


def ptxas_info(ptx: str, arch: int) -> tuple:
    """(registers, spill bytes) from ``ptxas -v`` on the kernel's PTX, or (None, None)."""
    import inspect

    from triton.backends.nvidia.compiler import get_ptxas
    try:  # its signature differs between triton releases
        ptxas = (get_ptxas(arch) if inspect.signature(get_ptxas).parameters else get_ptxas()).path
    except Exception:
        return None, None
    path = f"/tmp/fused_posenc_aot_{os.getpid()}.ptx"
    with open(path, "w") as f:
        f.write(ptx)
    sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    r = subprocess.run([ptxas, "-v", f"--gpu-name={sm}", path, "-o", os.devnull], capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


_JOBS: list = []  # filled before the worker processes fork; workers get indices (kernels do not pickle)


def compile_one(i: int) -> list:
    """One (variant, config) -> its CSV row."""
    label, fn, dtype, consts, warps, stages, arch, want_ptxas = _JOBS[i]
    meta = {k: v for k, v in consts.items() if k in ("BLOCK_M", "BLOCK_N")}
    try:
        src = ASTSource(fn=fn, signature=signature(fn, dtype, consts),
                        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        t = time.time()
        c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
        regs, spill = ptxas_info(c.asm["ptx"], arch) if want_ptxas else (None, None)
        status = "ok" if c.metadata.shared <= SMEM_LIMIT[arch] else "smem>limit"
        return [label, meta, warps, stages, status, c.metadata.shared, regs, spill, f"{time.time() - t:.1f}"]
    except Exception as e:  # a compile error is a finding: report it, keep going
        msg = str(e).strip().splitlines()
        return [label, meta, warps, stages, "ERROR " + (msg[-1][:300] if msg else type(e).__name__), None, None,
                None, ""]


def summary(csv_path: str) -> str:
    """Markdown table per (kernel, dtype, head dim): variants, how many spill registers, the worst spill."""
    table = {}
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            kernel, *rest = r["variant"].split(":")
            if kernel == "bwd_preprocess":
                continue
            key = (kernel, rest[-2], int(rest[-1][1:]))
            spill = int(r["spill_bytes"]) if r["spill_bytes"] not in ("", "None") else 0
            n, nspill, worst = table.get(key, (0, 0, 0))
            table[key] = (n + 1, nspill + (spill > 0), max(worst, spill))
    lines = ["| kernel | dtype | head dim | variants | with spills | max spill (bytes/thread) |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {dt} | {d} | {n} | {ns} | {w} |" for (k, dt, d), (n, ns, w) in sorted(table.items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_LIMIT))
    ap.add_argument("--quick", action="store_true", help="the first config of each variant only")
    ap.add_argument("--dims", type=int, nargs="*", default=[64, 128, 256], help="head dims")
    ap.add_argument("--dtypes", nargs="*", default=list(TL_DTYPE), choices=list(TL_DTYPE))
    ap.add_argument("--ptxas", action="store_true", help="also report registers and spills (ptxas -v)")
    ap.add_argument("--match", default="", help="only variants whose label contains this")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--csv")
    ap.add_argument("--summary", metavar="CSV", help="print the Markdown spill table of an earlier --csv and exit")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    jobs, groups = _JOBS, []
    for label, fn, dtype, cx, cfgs in variants(args.quick, args.dims, args.dtypes):
        if args.match in label:
            groups.append((label, len(cfgs)))
            jobs += [(label, fn, dtype, {**cx, **meta}, w, st, args.arch, args.ptxas) for meta, w, st in cfgs]
    t0 = time.time()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(max(1, args.jobs)) as pool:
        rows = []
        for row in pool.imap(compile_one, range(len(jobs))):
            rows.append(row)
            print(*row, sep="  ", flush=True)
    bad = sum(r[4].startswith("ERROR") for r in rows)
    for label, n in groups:  # the autotuner needs at least one config of each variant to fit
        if n and not any(r[0] == label and r[4] == "ok" for r in rows):
            bad += 1
            print(f"{label}: no config compiles and fits sm_{args.arch}'s shared memory", flush=True)
    print(f"{len(rows)} compiles of {len(groups)} variants for sm_{args.arch}, {bad} problem(s), "
          f"{time.time() - t0:.0f} s (triton {triton.__version__})")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["variant", "config", "num_warps", "num_stages", "status", "shared_bytes", "registers",
                        "spill_bytes", "compile_s"])
            w.writerows(rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
