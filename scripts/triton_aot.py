"""Compile the Triton kernels ahead of time for an NVIDIA target, no GPU needed (Triton's own
compiler pipeline down to a cubin through ptxas). It proves that every kernel variant lowers for
real hardware and, with ``--sass``, reports what each variant's compiled code does per tile.

    python scripts/triton_aot.py                      # sm_90: every variant, head dims 64/128/256, every config
    python scripts/triton_aot.py --quick --arch 80    # the first (preferred) config of each variant
    python scripts/triton_aot.py --ptxas --csv out.csv   # + registers and spills per variant
    python scripts/triton_aot.py --quick --sass --dims 128 --dtypes bf16 --csv s.csv --md s.md
        # + the main loop's SASS: instructions per thread per tile, HGMMA, MUFU, LDL/STL, barriers
    python scripts/triton_aot.py --md s.md --from s.csv  # re-render the Markdown report of CSV rows
    python scripts/triton_aot.py --compare before.csv after.csv  # before/after table of two runs
    python scripts/triton_aot.py --configs-table all.csv --match bwd_dkdv  # every config of a run without --quick

**Specialisation.** A kernel is compiled exactly as Triton's JIT would compile it for a realistic call
(``--batch 2 --seqlen 4096``, ``nheads = 2048 / headdim``, contiguous ``(B, L, H, D)`` tensors): the
package's own launchers run on ``meta`` tensors with every Triton kernel replaced by a recorder, and the
recorded arguments go through the JIT's binder (``create_function_from_signature`` + ``_pack_args``, the
code ``JITFunction.run`` runs; same in triton 3.6 and 3.9): 16-byte-aligned pointers and integers
divisible by 16 get ``tt.divisibility=16``, integers equal to 1 (``stride_d``, group sizes) become
constants. ``--no-specialize`` compiles the same arguments without it (no divisibility, ints as ``i32``),
as this script did before: that loop is not the loop a GPU runs (nothing is pipelined).

The SASS histogram is ``shared/tools/sass_loop.py`` (``--sass-tool``) run on each cubin; registers and
spills come from the ``ptxas -v`` log of the compile itself.

Exit status 1 if any variant fails to compile, a variant has no config that fits the target's shared
memory, or a recorded call lacks the constexprs its variant stands for. Runs with ``TRITON_INTERPRET``
unset (the interpreter has no compiler).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import importlib.util
import io
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import fused_posenc.ops.triton as triton_ops  # noqa: E402
from fused_posenc.attention import Problem  # noqa: E402
from fused_posenc.encodings import ALiBi, NoPE, RoPE, TAPA  # noqa: E402
from fused_posenc.encodings.fope import FoPE  # noqa: E402
from fused_posenc.ops.triton import autograd  # noqa: E402

SMEM_LIMIT = {80: 166912, 90: 232448}  # opt-in shared memory per block (bytes): A100, H100/H200
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
KERNEL_KIND = {"attn_fwd_kernel": "fwd", "attn_bwd_dkdv_kernel": "bwd_dkdv", "attn_bwd_dq_kernel": "bwd_dq",
               "attn_bwd_preprocess_kernel": "bwd_preprocess", "rotate_fwd_kernel": "rotate",
               "rope_table_kernel": "rope_table"}
EXPLICIT = {"explicit": True}  # caller-given positions (B, L), as Hugging Face passes position_ids


def _alibi_learnable(d, h):
    return ALiBi(torch.linspace(0.5, 0.01, h, device="meta").requires_grad_())


# name -> (encoding factory (head dim, heads), call options, constexprs the recorded calls must carry).
# Call options: explicit positions, causal, klen (per-row key lengths; left: counted
# from the end), splits (the forward's key ranges), window (left, right), softcap. GATHER = interleaved pairs,
# FOPE_GRAD = learnable FoPE, SLOPE_GRAD = learnable ALiBi slopes.
VARIANTS = {
    "none": (lambda d, h: NoPE(), {}, {"ENC": 0}),
    "none-noncausal": (lambda d, h: NoPE(), {"causal": False}, {"ENC": 0, "CAUSAL": False}),
    "rope": (lambda d, h: RoPE(), {}, {"ENC": 1, "GATHER": False}),
    "rope-gather": (lambda d, h: RoPE(interleaved=True), {}, {"ENC": 1, "GATHER": True}),
    "rope-explicit": (lambda d, h: RoPE(), EXPLICIT, {"ENC": 1, "DEFAULT_POS": False, "CAUSAL": True}),
    "fope": (lambda d, h: FoPE(head_dim=d), {}, {"ENC": 2}),
    "fope-learnable": (lambda d, h: FoPE(head_dim=d, learnable=True).to("meta"), {}, {"ENC": 2, "FOPE_GRAD": True}),
    "alibi": (lambda d, h: ALiBi(), {}, {"ENC": 3}),
    "alibi-explicit": (lambda d, h: ALiBi(), EXPLICIT, {"ENC": 3, "DEFAULT_POS": False}),
    "alibi-learnable": (_alibi_learnable, {}, {"ENC": 3, "SLOPE_GRAD": True}),
    "tapa": (lambda d, h: TAPA(), {}, {"ENC": 4}),
    "tapa-explicit": (lambda d, h: TAPA(), EXPLICIT, {"ENC": 4, "DEFAULT_POS": False}),
    # per-row key lengths (the varlen and KV-cache calls), and the forward's key splits (flash-decoding)
    "rope-keylen": (lambda d, h: RoPE(), {**EXPLICIT, "klen": True}, {"ENC": 1, "HAS_KLEN": True}),
    "rope-splits": (lambda d, h: RoPE(), {**EXPLICIT, "klen": True, "splits": 8}, {"ENC": 1, "HAS_KLEN": True}),
    # sliding windows (Mistral: default and caller-given positions), soft-capping with a window (Gemma-2), left
    # key padding (batched generate)
    "rope-window": (lambda d, h: RoPE(), {"window": (4095, -1)}, {"ENC": 1, "WINDOW": True}),
    "rope-window-explicit": (lambda d, h: RoPE(), {**EXPLICIT, "window": (4095, -1)},
                             {"ENC": 1, "WINDOW": True, "DEFAULT_POS": False}),
    "rope-softcap": (lambda d, h: RoPE(), {**EXPLICIT, "window": (4095, -1), "softcap": 50.0},
                     {"ENC": 1, "WINDOW": True, "SOFTCAP": True}),
    "rope-leftpad": (lambda d, h: RoPE(), {**EXPLICIT, "klen": True, "left": True}, {"ENC": 1, "KLEN_LEFT": True}),
}


# ---------------------------------------------------------------------------------------------------------
# a realistic call, recorded


class _Recorder:
    """Stands in for a kernel object: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def _is_kernel(obj) -> bool:
    return isinstance(obj, (JITFunction, triton.runtime.Autotuner, triton.runtime.Heuristics))


def jit_fn(kernel) -> JITFunction:
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


@contextlib.contextmanager
def recording(calls):
    """Replace every Triton kernel object in the ``fused_posenc.ops.triton`` modules by a recorder."""
    import importlib
    import pkgutil
    saved = []
    for info in pkgutil.iter_modules(triton_ops.__path__):
        mod = importlib.import_module(f"{triton_ops.__name__}.{info.name}")
        for name, obj in list(vars(mod).items()):
            if _is_kernel(obj):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, calls))
    try:
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def record_call(variant: str, dtype: str, d: int, batch: int, seqlen: int, model_dim: int):
    """The kernel launches of one forward + backward of ``variant``: ``[(kernel, args, kwargs)]``, in order.

    The launchers run for real (plan, pre-rotation, tables, bounds) on ``meta`` tensors: nothing is computed,
    every pointer is 16-byte aligned (as CUDA's allocator returns), every integer is what a GPU call passes."""
    make_enc, opts, _ = VARIANTS[variant]
    h = max(1, model_dim // d)
    enc = make_enc(d, h)
    dt = DTYPES[dtype]
    q, k, v = (torch.empty(batch, seqlen, h, d, device="meta", dtype=dt, requires_grad=True) for _ in range(3))
    pos = torch.arange(seqlen, device="meta")[None]
    if opts.get("explicit"):
        pos = pos.expand(batch, seqlen).contiguous()
    calls: list = []
    # the launches are custom ops, which meta tensors send to their fake implementations: call the real bodies
    ops = {name: getattr(autograd, name) for name in ("triton_forward", "triton_backward")}
    try:
        for name, op in ops.items():
            setattr(autograd, name, op._init_fn)
        with recording(calls):
            prob = Problem(q, k, v, enc, opts.get("causal", True), None, pos, pos, not opts.get("explicit", False))
            if opts.get("klen"):
                prob.k_lengths = torch.full((batch,), seqlen, dtype=torch.int32, device="meta")
                prob.k_padding_left = bool(opts.get("left"))
            prob.window, prob.softcap = opts.get("window"), opts.get("softcap")
            out = autograd.triton_attention(prob, num_splits=opts.get("splits", 1))
            wrt = [q, k, v] + [t for t in (getattr(enc, "_slopes", None), getattr(enc, "cos_coef", None))
                               if isinstance(t, torch.Tensor) and t.requires_grad]
            torch.autograd.grad(out, wrt, torch.empty_like(out), allow_unused=True)
    finally:
        for name, op in ops.items():
            setattr(autograd, name, op)
    return calls


# ---------------------------------------------------------------------------------------------------------
# the JIT's specialisation of a recorded call


def _configs(kernel, fn, args, kwargs, quick):
    """[config kwargs incl. num_warps/num_ctas/num_stages] as the autotuner tries them after its own
    early pruning; [{}] for a plain JIT kernel (the launch's defaults)."""
    if not isinstance(kernel, triton.runtime.Autotuner):
        return [{}]
    prune = getattr(kernel, "early_config_prune", None)
    cfgs = prune(kernel.configs, dict(zip(fn.arg_names, args)), **kwargs) if prune else kernel.configs
    cfgs = [c.all_kwargs() for c in cfgs]
    return cfgs[:1] if quick else cfgs


def jit_compile_inputs(fn: JITFunction, args, kwargs, target, specialize: bool):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` builds them for this call."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    if not specialize:  # the plain compile: no divisibility, integers the JIT made constants stay i32
        declared = {i for i, p in enumerate(fn.params) if p.is_constexpr}
        for (i,), v in list(constexprs.items()):
            if i not in declared:
                signature[fn.params[i].name] = "i32" if -2**31 <= v < 2**31 else "i64"
                del constexprs[(i,)]
        attrs = {}
    return signature, constexprs, attrs, options


def n_specialised(signature, constexprs, attrs, fn) -> tuple[int, int]:
    """(arguments with tt.divisibility=16, integers turned into constants)."""
    declared = {i for i, p in enumerate(fn.params) if p.is_constexpr}
    div = sum(1 for v in attrs.values() if ["tt.divisibility", 16] in v)
    return div, sum(1 for (i,) in constexprs if i not in declared)


# ---------------------------------------------------------------------------------------------------------
# reports of a compiled kernel


def ptxas_log_info(log: str) -> dict:
    """Registers, spill stores/loads and stack frame (bytes per thread) of a ``ptxas -v`` log."""
    out = {}
    for key, pat in (("registers", r"Used (\d+) registers"), ("spill_bytes", r"(\d+) bytes spill stores"),
                     ("spill_load_bytes", r"(\d+) bytes spill loads"), ("stack_bytes", r"(\d+) bytes stack frame")):
        m = re.search(pat, log)
        out[key] = int(m.group(1)) if m else None
    return out


def find_sass_tool(path=None):
    for p in ([path] if path else []) + [os.path.join(ROOT, "shared", "tools", "sass_loop.py"),
                                         os.path.join(os.path.dirname(ROOT), "shared", "tools", "sass_loop.py")]:
        if p and os.path.isfile(p):
            return p
    return None


SASS_KEYS = {"hgmma": "HGMMA", "hmma": "HMMA", "mufu": "MUFU", "ffma": "FFMA", "ldl": "LDL", "stl": "STL",
             "bar": "BAR", "warpgroup": "WARPGROUP", "shfl": "SHFL", "lds": "LDS", "ldgsts": "LDGSTS"}


def sass_loop(tool: str, cubin: str) -> dict:
    """The main loop's histogram from ``sass_loop.py``: loop_instrs (instructions per thread per tile) and
    the SASS_KEYS counts; ``{"loop_instrs": "no loop"}`` for a kernel without one."""
    r = subprocess.run([sys.executable, tool, cubin], capture_output=True, text=True)
    line = (r.stdout.strip().splitlines() or [""])[-1]
    m = re.search(r" loop (\d+) (\{.*?\}) (\{.*\})\s*$", line)
    if not m:
        return {"loop_instrs": "no loop" if "no loop" in line else f"error: {(r.stderr or line).strip()[-200:]}"}
    counts, mufu = ast.literal_eval(m.group(2)), ast.literal_eval(m.group(3))
    out = {"loop_instrs": int(m.group(1))}
    out.update({col: counts.get(op, 0) for col, op in SASS_KEYS.items()})
    out["mufu_ops"] = " ".join(f"{k.split('.', 1)[1]}:{v}" for k, v in sorted(mufu.items()))
    return out


def _tool_module(tool: str):
    """``sass_loop.py`` as a module (its parser), with no cubin on its command line."""
    spec = importlib.util.spec_from_file_location("sass_loop_tool", tool)
    mod = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, [tool]
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.argv = argv
    return mod


def tensor_core_loops(tool: str, cubin: str) -> dict:
    """Every innermost loop with tensor-core instructions (a kernel with an interior and a boundary stage has
    two; ``sass_loop.py`` reports the longest, the masked one): ``tc_loops`` their lengths in instructions per
    thread per tile, shortest first ("434/632"), and ``interior_instrs`` / ``interior_mufu`` / ``interior_ldl`` /
    ``interior_stl`` of the shortest."""
    mod = _tool_module(tool)
    ins, labels = mod.parse(cubin)
    spans = []
    for addr, text in ins:
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", text)
        if m and labels.get(m.group(1), 1 << 62) < addr:
            spans.append((labels[m.group(1)], addr))
    tc = [(lo, hi) for lo, hi in spans
          if any(lo <= a <= hi and ("HGMMA" in t or "HMMA" in t) for a, t in ins)]
    inner = [(lo, hi) for lo, hi in tc if not any((a, b) != (lo, hi) and lo <= a and b <= hi for a, b in tc)]
    bodies = sorted(([t for a, t in ins if lo <= a <= hi] for lo, hi in inner), key=len)
    if not bodies:
        return {}
    ops = [mod.opcode(t) for t in bodies[0]]
    return {"tc_loops": "/".join(str(len(b)) for b in bodies), "interior_instrs": len(bodies[0]),
            "interior_mufu": sum(o.startswith("MUFU") for o in ops),
            "interior_ldl": sum(o.startswith("LDL") for o in ops),
            "interior_stl": sum(o.startswith("STL") for o in ops)}


def kernel_instrs(cubin: str):
    """SASS instructions of the whole kernel (NOPs excluded), by the nvdisasm in triton's wheel; None if absent."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.isfile(tool):
        return None
    r = subprocess.run([tool, "-c", cubin], capture_output=True, text=True)
    return sum(1 for line in r.stdout.splitlines()
               if re.match(r"\s*/\*[0-9a-f]+\*/\s+(?!NOP\b)\S", line)) if r.returncode == 0 else None


COLUMNS = ["variant", "kernel", "encoding", "dtype", "d", "config", "num_warps", "num_stages", "status",
           "shared_bytes", "registers", "spill_bytes", "spill_load_bytes", "stack_bytes", "kernel_instrs",
           "loop_instrs", "tc_loops", "interior_instrs", "interior_mufu", "interior_ldl", "interior_stl", "hgmma",
           "hmma", "mufu", "mufu_ops", "ffma", "ldl", "stl", "bar", "warpgroup", "shfl", "lds", "ldgsts",
           "specialised", "div16_args", "const1_args", "triton", "commit", "compile_s"]

_JOBS: list = []  # filled before the worker processes fork; workers get indices (kernels do not pickle)


def compile_one(i: int) -> dict:
    """One (variant, config) -> its CSV row."""
    job = _JOBS[i]
    fn, args, kwargs, cfg, arch = job["fn"], job["args"], job["kwargs"], job["cfg"], job["arch"]
    row = {k: job[k] for k in ("variant", "kernel", "encoding", "dtype", "d", "specialised", "triton", "commit")}
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_ctas", "num_stages", "maxnreg")}
    row["config"] = str(meta)
    try:
        target = GPUTarget("cuda", arch, 32)
        sig, consts, attrs, options = jit_compile_inputs(fn, args, {**kwargs, **cfg}, target, job["specialize"])
        row["num_warps"], row["num_stages"] = options.num_warps, options.num_stages
        row["div16_args"], row["const1_args"] = n_specialised(sig, consts, attrs, fn)
        t = time.time()
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # knobs.nvidia.dump_ptxas_log prints the compile's ptxas -v
            c = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options.__dict__)
        row["compile_s"] = f"{time.time() - t:.1f}"
        row["shared_bytes"] = c.metadata.shared
        row["status"] = "ok" if c.metadata.shared <= SMEM_LIMIT[arch] else "smem>limit"
        if job["ptxas"]:
            row.update(ptxas_log_info(log.getvalue()))
        if job["sass_tool"]:
            path = os.path.join(job["cubin_dir"], f"{i:04d}_" + re.sub(r"[^A-Za-z0-9_.-]", "_", row["variant"])
                                + f"_w{options.num_warps}s{options.num_stages}.cubin")
            with open(path, "wb") as f:
                f.write(c.asm["cubin"])
            row.update(sass_loop(job["sass_tool"], path))
            row.update(tensor_core_loops(job["sass_tool"], path))
            row["kernel_instrs"] = kernel_instrs(path)
    except Exception as e:  # a compile error is a finding: report it, keep going
        msg = str(e).strip().splitlines()
        row["status"] = "ERROR " + (msg[-1][:300] if msg else type(e).__name__)
    return row


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--",
                                "fused_posenc"], capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def plan_jobs(args) -> tuple[list, list, list]:
    """(jobs, [(variant label, number of configs)], problems) for the selected variants."""
    jobs, groups, problems, seen = [], [], [], set()
    commit = _commit()
    sass_tool = find_sass_tool(args.sass_tool) if args.sass else None
    for name, dtype, d in itertools.product(VARIANTS, args.dtypes, args.dims):
        try:
            calls = record_call(name, dtype, d, args.batch, args.seqlen, args.model_dim)
        except Exception as e:
            label = f"*:{name}:{dtype}:d{d}"
            if args.match in label:
                problems.append(f"{label}: the launchers failed on a recorded call: {type(e).__name__}: {e}")
            continue
        kinds_seen = set()
        for kernel, cargs, ckwargs in calls:
            fn = jit_fn(kernel)
            kind = KERNEL_KIND.get(fn.__name__, fn.__name__.removesuffix("_kernel"))
            if kind in kinds_seen:  # e.g. the second pre-rotation of a call (same kernel, other operand)
                continue
            kinds_seen.add(kind)
            per_encoding = "ENC" in fn.arg_names
            label = f"{kind}:{name}:{dtype}:d{d}" if per_encoding else f"{kind}:{dtype}:d{d}"
            if label in seen or args.match not in label:
                continue
            seen.add(label)
            want = VARIANTS[name][2]
            bad = {k: (ckwargs[k], v) for k, v in want.items() if k in fn.arg_names and k in ckwargs
                   and ckwargs[k] != v}
            if bad and per_encoding:
                problems.append(f"{label}: the launcher passes {bad} (got, wanted): the variant is not what it says")
            cfgs = _configs(kernel, fn, cargs, ckwargs, args.quick)
            groups.append((label, len(cfgs)))
            for cfg in cfgs:
                jobs.append(dict(variant=label, kernel=kind, encoding=name if per_encoding else "", dtype=dtype, d=d,
                                 fn=fn, args=cargs, kwargs=ckwargs, cfg=cfg, arch=args.arch,
                                 specialize=not args.no_specialize, specialised="no" if args.no_specialize else "jit",
                                 ptxas=args.ptxas or args.sass, sass_tool=sass_tool, cubin_dir=args.cubin_dir,
                                 triton=triton.__version__, commit=commit))
    if args.sass and not sass_tool:
        problems.append("--sass: sass_loop.py not found (shared/tools/sass_loop.py; give --sass-tool PATH)")
    return jobs, groups, problems


# ---------------------------------------------------------------------------------------------------------
# Markdown


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


def _loops(r: dict):
    """``(interior instrs, interior MUFU, boundary instrs)`` of a row: a row without the tensor-core loop columns (an
    older CSV: the kernels had one masked loop) has one loop, which is both."""
    if r.get("interior_instrs"):
        parts = r["tc_loops"].split("/")
        return r["interior_instrs"], r["interior_mufu"], parts[-1] if len(parts) > 1 else ""
    return r.get("loop_instrs", ""), r.get("mufu", ""), ""


def per_score(r: dict, instrs) -> str:
    """Warp instructions per 1024 score elements of a loop that runs ``instrs`` instructions per thread per tile: the
    loop's cost per unit of work, comparable across tile shapes (``instrs * warps * 1024 / (BLOCK_M * BLOCK_N)``)."""
    blocks = ast.literal_eval(r["config"]) if r.get("config") else {}
    if not str(instrs).isdigit() or "BLOCK_M" not in blocks or "BLOCK_N" not in blocks:
        return ""
    return str(round(int(instrs) * int(r["num_warps"]) * 1024 / (blocks["BLOCK_M"] * blocks["BLOCK_N"])))


def compare(before_csv: str, after_csv: str) -> str:
    """Markdown table of the variants two CSVs share (the kernels before and after a change; a variant whose
    label lost its encoding, e.g. ``rotate:rope:...`` -> ``rotate:...``, is matched through it): registers, spills,
    the interior (unmasked) loop's and the boundary loop's instructions per thread per tile, MUFU per interior
    tile, local loads/stores per tile, kernel instructions."""
    before = {r["variant"]: r for r in read_rows(before_csv)}
    after = {r["variant"]: r for r in read_rows(after_csv)}
    lines = ["| variant | config | regs | spill st/ld B | loop instrs: interior (boundary) | warp instrs per 1024 "
             "scores (interior) | MUFU / interior tile | LDL/STL per interior tile | kernel instrs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, a in after.items():
        kind, *rest = name.split(":")
        b = before.get(name) or next((r for v, r in before.items() if v.split(":")[0] == kind
                                      and v.split(":")[-2:] == rest[-2:] and len(rest) == 2
                                      and v.split(":")[1] == "rope"), None)
        if b is None or a.get("status") != "ok" or kind == "bwd_preprocess":
            continue
        (bi, bm, _), (ai, am, ab) = _loops(b), _loops(a)
        b_ls = f"{b['ldl']}/{b['stl']}" if not b.get("interior_instrs") else f"{b['interior_ldl']}/{b['interior_stl']}"
        a_ls = f"{a['ldl']}/{a['stl']}" if not a.get("interior_instrs") else f"{a['interior_ldl']}/{a['interior_stl']}"
        loop = f"{bi} -> {ai}" + (f" ({ab})" if ab else "")
        bc, ac = _cell(b, "config"), _cell(a, "config")
        cells = [bc if bc == ac else f"{bc} -> {ac}", f"{b['registers']} -> {a['registers']}",
                 f"{b['spill_bytes']}/{b['spill_load_bytes']} -> {a['spill_bytes']}/{a['spill_load_bytes']}", loop,
                 f"{per_score(b, bi)} -> {per_score(a, ai)}", f"{bm} -> {am}", f"{b_ls} -> {a_ls}",
                 f"{b['kernel_instrs']} -> {a['kernel_instrs']}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def configs_table(csv_path: str, match: str = "") -> str:
    """Markdown table of every config of every variant in a CSV (a run without ``--quick``): the interior loop's
    instructions per tile and per 1024 scores, spills and local memory, to choose a config table's order from."""
    lines = ["| variant | config | smem KB | regs | spill st/ld B | interior instrs / tile | warp instrs per 1024 scores "
             "| MUFU / tile | LDL/STL per tile |", "|---|---|---|---|---|---|---|---|---|"]
    for r in read_rows(csv_path):
        if match not in r["variant"] or r.get("status") != "ok":
            continue
        ii = _loops(r)[0]
        lines.append(f"| {r['variant']} | {_cell(r, 'config')} | {_cell(r, 'shared_bytes')} | {r['registers']} | "
                     f"{_cell(r, 'spill')} | {ii} | {per_score(r, ii)} | {r.get('interior_mufu', '')} | "
                     f"{r.get('interior_ldl', '')}/{r.get('interior_stl', '')} |")
    return "\n".join(lines)


# Issue 10's numbers (triton 3.6, the kernels as they were when it was filed):
# (variant, column, value, the compile it describes: "jit" or "no" specialisation, what)
ISSUE_BEFORE = [
    ("fwd:none:bf16:d128", "shared_bytes", 48 * 1024, "no", "d128 forward shared memory, unspecialised"),
    ("fwd:none:bf16:d128", "registers", 189, "no", "d128 forward registers, unspecialised"),
    ("fwd:none:bf16:d128", "shared_bytes", 128 * 1024, "jit", "d128 forward shared memory"),
    ("fwd:none:bf16:d128", "registers", 165, "jit", "d128 forward registers"),
    ("fwd:none:bf16:d128", "loop_instrs", 573, "jit", "forward loop instructions/thread/tile, causal"),
    ("fwd:none:bf16:d128", "mufu", 34, "jit", "forward MUFU/thread/tile, no encoding"),
    ("fwd:tapa:bf16:d128", "mufu", 102, "jit", "TAPA forward MUFU/thread/tile"),
    ("bwd_dkdv:none:bf16:d128", "mufu_ops", "EX2:32", "jit", "bwd (64,64,8 warps) exp2/thread/tile (16 needed)"),
    ("bwd_dq:none:bf16:d128", "mufu_ops", "EX2:32", "jit", "bwd (64,64,8 warps) exp2/thread/tile (16 needed)"),
    ("bwd_dkdv:tapa:bf16:d128", "stl", 58, "jit", "TAPA dk/dv loop local stores/tile"),
    ("bwd_dkdv:tapa:bf16:d128", "ldl", 104, "jit", "TAPA dk/dv loop local loads/tile"),
    ("bwd_dkdv:none:bf16:d128", "loop_instrs", 820, "jit", "dk/dv loop instructions/tile (tutorial's S^T form: 745)"),
    ("bwd_dkdv:none:bf16:d128", "warpgroup", 80, "jit", "dk/dv loop warpgroup syncs/tile (tutorial's S^T form: 9)"),
    ("fwd:rope:bf16:d128", "loop_instrs", 562, "jit", "forward loop, RoPE with pre-rotated keys"),
    ("rotate:rope:bf16:d128", "registers", 249, "jit", "RoPE pre-rotation kernel registers (table-driven: 100)"),
    ("rotate:rope:bf16:d128", "kernel_instrs", 5760, "jit",
     "RoPE pre-rotation kernel instructions (table-driven: 560)"),
]


def _issue_value(r, col):
    got = "" if r is None else (r.get(col) or "")
    if col == "mufu_ops":
        got = next((p for p in str(got).split() if p.startswith("EX2:")), "EX2:0" if r else "")
    return str(got)


HEADLINE = [f"{k}:{e}:bf16:d128" for e in ("none", "rope", "tapa") for k in ("fwd", "bwd_dq", "bwd_dkdv")]

TABLE_COLS = [("config", "config (M/N, warps, stages)"), ("shared_bytes", "smem KB"), ("registers", "regs"),
              ("spill", "spill st/ld B"), ("kernel_instrs", "kernel instrs"),
              ("loop_instrs", "loop instrs"), ("hgmma", "HGMMA"), ("hmma", "HMMA"), ("mufu", "MUFU"),
              ("mufu_ops", "MUFU ops"), ("ldl", "LDL"), ("stl", "STL"), ("bar", "BAR"), ("warpgroup", "WARPGROUP")]


def _cell(r, col):
    if col == "config":
        m = ast.literal_eval(r["config"]) if r["config"] else {}
        blocks = "/".join(str(v) for v in m.values())
        return f"{blocks + ', ' if blocks else ''}{r['num_warps']}w {r['num_stages']}s"
    if col == "shared_bytes":
        return f"{int(r[col]) / 1024:.0f}" if r.get(col) not in (None, "", "None") else ""
    if col == "loop_instrs" and str(r.get("loop_instrs", "")).isdigit() and not int(r.get("hgmma") or 0) \
            and not int(r.get("hmma") or 0):
        return f"{r['loop_instrs']} (no MMA loop)"
    if col == "spill":
        return f"{r.get('spill_bytes') or ''}/{r.get('spill_load_bytes') or ''}".strip("/")
    return str(r.get(col) if r.get(col) not in (None, "None") else "")


def _source_line(rows) -> str:
    keys = sorted({(r.get("triton", ""), r.get("specialised", ""), r.get("commit", "")) for r in rows})
    return "; ".join(f"triton {t}, specialisation {'JIT' if s == 'jit' else 'none'}, commit {c}" for t, s, c in keys)


def markdown(rows, commands=None, notes=None) -> str:
    """The report: per (triton, specialisation) a table per dtype/head dim, then the before/after tables."""
    out = ["# Static sm_90 report of the Triton kernels (no GPU)", "",
           "Compiled by Triton's own pipeline down to a cubin for `GPUTarget('cuda', 90, 32)`, with the JIT's "
           "argument specialisation of a realistic call (batch 2, seqlen 4096, nheads = 2048 / headdim, contiguous "
           "(B, L, H, D) tensors: 16-byte-aligned pointers and integers divisible by 16 get `tt.divisibility=16`, "
           "integers equal to 1 become constants), the first (preferred) autotune config of each variant. "
           "Registers and spills (bytes/thread) from the compile's own `ptxas -v`; shared memory from Triton's "
           "metadata; the loop columns are `shared/tools/sass_loop.py` on the cubin: the main loop's SASS per "
           "thread per tile (instructions, HGMMA, MUFU, local loads/stores LDL/STL, BAR, WARPGROUP "
           "arrive/depbar). Static evidence, not timings.", ""]
    if commands:
        out += ["Regenerate (2-core CPU, no GPU):", "", *[f"    {c}" for c in commands], ""]
    out += [f"Sources: {_source_line(rows)}.", ""]
    for note in notes or []:
        out += [note, ""]
    runs = {}
    for r in rows:
        runs.setdefault((r.get("triton", ""), r.get("specialised", "")), []).append(r)
    order = sorted(runs, key=lambda k: (k[1] != "jit", [-int(x) for x in re.findall(r"\d+", k[0])]))
    head = [(k, r) for k in order if k[1] == "jit" for v in HEADLINE for r in runs[k]
            if r["variant"] == v and r["status"].startswith("ok")]
    if head:
        out += ["## Headline: bf16, head dim 128, JIT specialisation", "",
                "| triton | variant | " + " | ".join(h for _, h in TABLE_COLS) + " |",
                "|---|---|" + "|".join("---:" if c not in ("config", "mufu_ops") else "---" for c, _ in TABLE_COLS)
                + "|"]
        out += [f"| {k[0]} | {r['variant']} | " + " | ".join(_cell(r, c) for c, _ in TABLE_COLS) + " |"
                for k, r in head]
        out.append("")
    for tv, spec in order:
        rs = runs[(tv, spec)]
        for dtype, d in sorted({(r["dtype"], int(r["d"])) for r in rs}):
            sel = [r for r in rs if r["dtype"] == dtype and int(r["d"]) == d]
            out += [f"## triton {tv}, {'JIT specialisation' if spec == 'jit' else 'no specialisation'}: "
                    f"{dtype}, head dim {d}", "",
                    "| variant | " + " | ".join(h for _, h in TABLE_COLS) + " |",
                    "|---|" + "|".join("---:" if c not in ("config", "mufu_ops") else "---" for c, _ in TABLE_COLS)
                    + "|"]
            for r in sel:
                if not r["status"].startswith("ok"):
                    out.append(f"| {r['variant']} | {r['status']} |" + " |" * (len(TABLE_COLS) - 1))
                    continue
                out.append(f"| {r['variant']} | " + " | ".join(_cell(r, c) for c, _ in TABLE_COLS) + " |")
            out.append("")
    # before (no specialisation) -> after (JIT), same triton
    pairs = []
    for tv in sorted({k[0] for k in runs}):
        before = {r["variant"]: r for r in runs.get((tv, "no"), [])}
        for r in runs.get((tv, "jit"), []):
            if r["variant"] in before:
                pairs.append((tv, before[r["variant"]], r))
    if pairs:
        out += ["## What the specialisation changes", "",
                "Same triton, same arguments; before = compiled without the JIT's specialisation (this script's "
                "old behaviour), after = as the JIT compiles it.", "",
                "| triton | variant | smem KB | regs | spill st B | loop instrs | HGMMA | LDGSTS | MUFU |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for tv, b, a in pairs:
            cells = [f"{_cell(b, c)} -> {_cell(a, c)}" for c in ("shared_bytes", "registers", "spill_bytes",
                                                                   "loop_instrs", "hgmma", "ldgsts", "mufu")]
            out.append(f"| {tv} | {a['variant']} | " + " | ".join(cells) + " |")
        out.append("")
    # issue 10's quoted numbers vs these compiles
    keys = sorted(runs, key=lambda k: (k[1] != "no", k[0]))
    out += ["## Issue 10's numbers (the \"before\") vs these compiles", "",
            "The issue's figures were taken with triton 3.6 on the kernels as they were when it was filed (since "
            "then: int64 turn-fraction angles, causal bounds for explicit positions, ...). *matches*: the runs of "
            "the same kind (JIT or plain compile) whose number equals the issue's.", "",
            "| what (issue 10) | variant | column | compile | issue | " + " | ".join(
                f"triton {tv} {'JIT' if s == 'jit' else 'plain'}" for tv, s in keys) + " | matches |",
            "|---|---|---|---|---:|" + "---:|" * len(keys) + "---|"]
    for variant, col, val, kind, what in ISSUE_BEFORE:
        cells, same = [], []
        for key in keys:
            r = next((x for x in runs[key] if x["variant"] == variant and x["status"].startswith("ok")), None)
            got = _issue_value(r, col)
            if key[1] == kind and got == str(val):
                same.append(f"{key[0]}")
            cells.append(f"{int(got) // 1024} KB" if col == "shared_bytes" and got.isdigit() else got)
        shown = f"{val // 1024} KB" if col == "shared_bytes" else val
        out.append(f"| {what} | {variant} | {col} | {'JIT' if kind == 'jit' else 'plain'} | {shown} | "
                   + " | ".join(cells) + f" | {', '.join(same) or 'no'} |")
    out.append("")
    return "\n".join(out)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SMEM_LIMIT))
    ap.add_argument("--quick", action="store_true", help="the first config of each variant only")
    ap.add_argument("--dims", type=int, nargs="*", default=[64, 128, 256], help="head dims")
    ap.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--ptxas", action="store_true", help="also report registers and spills (the compile's ptxas -v)")
    ap.add_argument("--sass", action="store_true", help="+ registers/spills and the main loop's SASS histogram")
    ap.add_argument("--sass-tool", help="path of sass_loop.py (default: shared/tools/sass_loop.py)")
    ap.add_argument("--cubin-dir", help="keep the cubins here (default: a temporary folder)")
    ap.add_argument("--no-specialize", action="store_true",
                    help="compile without the JIT's argument specialisation (the misleading old report)")
    ap.add_argument("--batch", type=int, default=2, help="batch of the recorded realistic call")
    ap.add_argument("--seqlen", type=int, default=4096, help="seqlen of the recorded realistic call")
    ap.add_argument("--model-dim", type=int, default=2048, help="nheads = model_dim / headdim")
    ap.add_argument("--match", default="", help="only variants whose label contains this")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--csv", help="write the rows here")
    ap.add_argument("--append", action="store_true", help="append to --csv (one file for several runs)")
    ap.add_argument("--md", help="write the Markdown report of this run's rows (or of --from's)")
    ap.add_argument("--from", dest="from_csv", metavar="CSV", help="with --md: render this CSV, compile nothing")
    ap.add_argument("--command", action="append", help="with --md: a command line to list under 'Regenerate'")
    ap.add_argument("--note", action="append", help="with --md: a paragraph under the sources line")
    ap.add_argument("--summary", metavar="CSV", help="print the Markdown spill table of an earlier --csv and exit")
    ap.add_argument("--configs-table", metavar="CSV",
                    help="print the Markdown table of every config in a --csv (with --match) and exit")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                    help="print the Markdown before/after table of two --csv files and exit")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    if args.compare:
        print(compare(*args.compare))
        return 0
    if args.configs_table:
        print(configs_table(args.configs_table, args.match))
        return 0
    if args.from_csv:
        if not args.md:
            ap.error("--from needs --md")
        with open(args.md, "w") as f:
            f.write(markdown(read_rows(args.from_csv), args.command, args.note))
        return 0
    tmp = None
    if (args.sass or args.ptxas) and not args.cubin_dir:
        tmp = tempfile.TemporaryDirectory(prefix="fused_posenc_aot_")
        args.cubin_dir = tmp.name
    if args.cubin_dir:
        os.makedirs(args.cubin_dir, exist_ok=True)
    if args.sass or args.ptxas:  # every compile runs ptxas and prints its -v log (no cache hit without one)
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
    t0 = time.time()
    jobs, groups, problems = plan_jobs(args)
    _JOBS[:] = jobs
    print(f"{len(jobs)} compile(s) planned in {time.time() - t0:.0f} s", flush=True)
    ctx = multiprocessing.get_context("fork")
    rows = []
    with ctx.Pool(max(1, args.jobs)) as pool:
        for row in pool.imap(compile_one, range(len(jobs))):
            rows.append(row)
            print(*(row.get(k, "") for k in ("variant", "config", "num_warps", "num_stages", "status",
                                             "shared_bytes", "registers", "spill_bytes", "loop_instrs", "hgmma",
                                             "mufu", "ldl", "stl", "compile_s")), sep="  ", flush=True)
    for p in problems:
        print(p, flush=True)
    bad = len(problems) + sum(r["status"].startswith("ERROR") for r in rows)
    for label, n in groups:  # the autotuner needs at least one config of each variant to fit
        if n and not any(r["variant"] == label and r["status"] == "ok" for r in rows):
            bad += 1
            print(f"{label}: no config compiles and fits sm_{args.arch}'s shared memory", flush=True)
    print(f"{len(rows)} compiles of {len(groups)} variants for sm_{args.arch}, {bad} problem(s), "
          f"{time.time() - t0:.0f} s (triton {triton.__version__}, "
          f"{'no specialisation' if args.no_specialize else 'JIT specialisation'})")
    if args.csv:
        new = not (args.append and os.path.exists(args.csv))
        with open(args.csv, "w" if new else "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(rows)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown([{k: ("" if r.get(k) is None else str(r.get(k))) for k in COLUMNS} for r in rows],
                             args.command, args.note))
    if tmp is not None:
        tmp.cleanup()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
