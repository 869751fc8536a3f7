"""Context parallelism: ring attention over 2 and 3 gloo processes (spawned here, bounded in time) equals the
single-process computation, forward and every gradient (q, k, v on their own ranks; FoPE coefficients and ALiBi
slopes summed over the ranks), for every encoding, causal and not, contiguous and zigzag shards, with global
positions starting at 100000. Plus the layout helpers."""
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fused_posenc.distributed import shard, shard_rows, unshard

ENCODINGS = ["none", "rope", "hope", "fope", "alibi", "tapa"]
OFFSET = 100000


def _encoding(name):
    from fused_posenc import ALiBi, FoPE

    if name == "fope":
        return FoPE(head_dim=16, num_heads=4, train_len=64, seed=5, learnable=True)
    if name == "alibi":
        return ALiBi(slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625], requires_grad=True))
    return name


def _worker(rank, world, init, backend, dtype_name, out_dir):
    try:
        _run_cases(rank, world, init, backend, getattr(torch, dtype_name))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _run_cases(rank, world, init, backend, dtype):
    from fused_posenc import fused_attention
    from fused_posenc.distributed import ring_attention

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    tol = 1e-10 if dtype == torch.float64 else 3e-5
    try:
        for name in ENCODINGS:
            for causal in (False, True):
                for layout in ("contiguous", "zigzag"):
                    torch.manual_seed(0)  # every rank draws the same whole problem
                    enc = _encoding(name)
                    b, n, h, hkv, d = 2, 4 * world, 4, 2, 16
                    q, k, v = (torch.randn(b, n, hh, d, dtype=dtype, requires_grad=True) for hh in (h, hkv, hkv))
                    pos = OFFSET + torch.arange(n)
                    params = [] if isinstance(enc, str) else [
                        t for t in ([enc._slopes] if name == "alibi" else list(enc.parameters()))]
                    full = fused_attention(q, k, v, enc, causal=causal, q_positions=pos, k_positions=pos,
                                           backend=backend)
                    do = torch.randn_like(full)
                    ref = torch.autograd.grad(full, [q, k, v, *params], do)
                    local = [shard(t.detach(), rank, world, layout).requires_grad_() for t in (q, k, v)]
                    out = ring_attention(*local, enc, causal=causal, layout=layout, position_offset=OFFSET,
                                         backend=backend)
                    got = torch.autograd.grad(out, [*local, *params], shard(do, rank, world, layout))
                    what = f"{name} causal={causal} {layout} world={world} rank={rank}"
                    _close(f"out {what}", out, shard(full, rank, world, layout), tol)
                    for i, g in enumerate(got[:3]):
                        _close(f"d{'qkv'[i]} {what}", g, shard(ref[i], rank, world, layout), tol)
                    for j, (p, g) in enumerate(zip(params, got[3:])):  # each rank's share: summed over ranks
                        g = g.clone()
                        dist.all_reduce(g)
                        _close(f"dparam {what}", g, ref[3 + j],  # float32 parameters: float32 sums
                               tol if p.dtype == torch.float64 else 3e-5)
    finally:
        dist.destroy_process_group()


def _close(what, a, b, tol):
    err = (a.double() - b.double()).abs().max().item()
    scale = max(1.0, b.double().abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.0e} x {scale:.2f}"


def _spawn(world, backend, dtype_name, tmp_path, timeout=240):
    init = f"file://{tmp_path}/rendezvous"
    ctx = mp.spawn(_worker, args=(world, init, backend, dtype_name, str(tmp_path)), nprocs=world, join=False)
    try:
        import time
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ring attention with {world} processes did not finish in {timeout} s")
    except mp.ProcessRaisedException as e:
        errs = [p.read_text() for p in sorted(tmp_path.glob("rank*.err"))]
        raise AssertionError("\n".join(errs) or str(e)) from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def test_ring_two_processes_float64_reference(tmp_path):
    _spawn(2, "torch", "float64", tmp_path)


def test_ring_three_processes_cpu_backend(tmp_path):
    from fused_posenc.backends import get_backend

    ok, why = get_backend("cpu").available()
    if not ok:
        pytest.skip(why)
    _spawn(3, "cpu", "float32", tmp_path)


def test_layouts():
    assert shard_rows(8, 0, 2).tolist() == [0, 1, 2, 3]
    assert shard_rows(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]
    assert shard_rows(12, 0, 3, "zigzag").tolist() == [0, 1, 10, 11]
    x = torch.arange(2 * 12).view(2, 12)
    for layout in ("contiguous", "zigzag"):
        parts = [shard(x, r, 3, layout) for r in range(3)]
        assert torch.equal(unshard(parts, layout), x)
        assert sorted(torch.cat([shard_rows(12, r, 3, layout) for r in range(3)]).tolist()) == list(range(12))
    with pytest.raises(ValueError, match="multiple of 6"):
        shard_rows(8, 0, 3, "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        shard_rows(8, 0, 2, "striped")


def test_ring_needs_a_process_group():
    from fused_posenc.distributed import ring_attention

    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)
