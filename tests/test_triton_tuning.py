"""The autotuning spaces: every config a launcher may ask for is offered, the pruner keeps the spaces of the
call's head-dim class and dtype in their best-first order, and FUSED_POSENC_AUTOTUNE=0 keeps the first.
Pure Python (no kernel runs); the GPU path is selected by unsetting TRITON_INTERPRET."""
import pytest

triton = pytest.importorskip("triton")

from fused_posenc.ops.triton import tuning  # noqa: E402

NAMES = {"fwd": ("BLOCK_M", "BLOCK_N"), "dq": ("BLOCK_M", "BLOCK_N"), "dkdv": ("BLOCK_N", "BLOCK_M")}


def _key(cfg, names):
    return cfg.kwargs[names[0]], cfg.kwargs[names[1]], cfg.num_warps, cfg.num_stages


@pytest.mark.parametrize("enc", [0, tuning.ENC_TAPA])
@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("dtype", ["torch.float16", "torch.bfloat16", "torch.float32"])
@pytest.mark.parametrize("p1,p2,dv,klass", [(32, 0, 64, 64), (64, 0, 64, 64), (40, 40, 80, 128), (64, 64, 128, 128),
                                            (128, 128, 256, 256), (128, 0, 96, 128), (32, 32, 200, 256),
                                            (64, -16, 64, 64), (128, -16, 128, 128), (256, -16, 256, 256)])
def test_pruner_keeps_the_class_space_in_order(monkeypatch, enc, kind, dtype, p1, p2, dv, klass):
    """``p2 < 0``: a one-dot call (``ONE_DOT``: part 1 is the whole head, ``BLOCK_P2`` the unused minimum 16),
    classed by part 1 alone. TAPA's dk/dv kernel has a table of its own (half precision)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("FUSED_POSENC_AUTOTUNE", raising=False)
    names = NAMES[kind]
    offered = tuning.configs(kind, names)
    table = tuning._TABLES[kind]
    if dtype == "torch.float32":
        table = tuning._FP32
    elif kind == "dkdv" and enc == tuning.ENC_TAPA:
        table = tuning._DKDV_TAPA
    meta = {"BLOCK_P1": p1, "BLOCK_P2": abs(p2), "ONE_DOT": p2 < 0, "BLOCK_DV": dv, "DTYPE_KEY": dtype, "ENC": enc}
    kept = tuning.pruner(kind, names)["early_config_prune"](offered, meta)
    assert [_key(c, names) for c in kept] == table[klass]
    monkeypatch.setenv("FUSED_POSENC_AUTOTUNE", "0")
    first = tuning.pruner(kind, names)["early_config_prune"](offered, meta)
    assert [_key(c, names) for c in first] == table[klass][:1]


def test_interpreter_runs_one_small_config(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (cfg,) = tuning.configs("fwd", NAMES["fwd"])
    assert cfg.kwargs == {"BLOCK_M": 16, "BLOCK_N": 16}


@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv", "dkdv-tapa"])
def test_half_precision_configs_give_every_warp_16_rows(kind):
    """No half-precision config lets two warpgroups duplicate a chained dot: the rows of the score tiles and of the
    accumulators (the stationary block, config[0]: queries for fwd/dq, keys for dk/dv, which works on S^T) are >= 16
    per warp. fp32 (FMA dots) is exempt."""
    table = tuning._DKDV_TAPA if kind == "dkdv-tapa" else tuning._TABLES[kind]
    for klass, cfgs in table.items():
        for c in cfgs:
            assert c[0] >= 16 * c[2], f"{kind} d{klass}: {c} gives a warp < 16 rows"


def test_pruner_drops_a_config_with_too_few_rows(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    names = NAMES["dq"]
    monkeypatch.setitem(tuning._DQ, 128, [(64, 64, 8, 2), (64, 64, 4, 2)])
    offered = [tuning._tag(c, names) for c in ((64, 64, 8, 2), (64, 64, 4, 2))]
    meta = {"BLOCK_P1": 64, "BLOCK_P2": 64, "BLOCK_DV": 128, "DTYPE_KEY": "torch.bfloat16"}
    kept = tuning.pruner("dq", names)["early_config_prune"](offered, meta)
    assert [_key(c, names) for c in kept] == [(64, 64, 4, 2)]
