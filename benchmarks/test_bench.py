"""pytest-benchmark entry: a small default subset of the harness.

    pytest benchmarks --benchmark-only                       # GPU: bf16 hdim 128 causal at 1k/4k; CPU: tiny fp32
    pytest benchmarks --benchmark-only --benchmark-json out.json

It lives in benchmarks/, outside ``testpaths`` (tests/), so a normal ``pytest`` run never collects it.
Timing here is pytest-benchmark's (wall clock around a synchronised call); the CSV harness
(``benchmarks/run.py``) is the reference method (do_bench, rotating inputs, memory).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("pytest_benchmark")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import ENCODINGS, Shape, Skip, flops, make_inputs, make_step, tokens_shape  # noqa: E402
from providers import all_providers  # noqa: E402

PROVIDERS = all_providers()
if torch.cuda.is_available():
    SHAPES = [tokens_shape(n, 16384, 128, True, "bf16", "cuda") for n in (1024, 4096)]
    NAMES = ("ours-triton", "ours-cuda", "sdpa-flash", "rotate+sdpa-flash", "liger+sdpa-flash", "fope-authors", "flex")
    MODES = ("fwd", "fwd+bwd")
    ROUNDS = 20
else:
    SHAPES = [Shape(2, 128, 2, 32, True, "fp32", "cpu")]
    NAMES = ("ours-cpu", "ours-triton", "sdpa-math", "rotate+sdpa-math", "fope-authors")
    MODES = ("fwd", "fwd+bwd")
    ROUNDS = 5

CASES = [(name, enc, shape, mode) for shape in SHAPES for enc in ENCODINGS for name in NAMES
         if enc in PROVIDERS[name].encodings for mode in MODES]


@pytest.mark.parametrize("name,encoding,shape,mode", CASES,
                         ids=[f"{n}-{e}-L{s.seqlen}-{m}" for n, e, s, m in CASES])
def test_attention(benchmark, name, encoding, shape, mode):
    try:
        fwd = PROVIDERS[name].build(encoding, shape)
    except Skip as e:
        pytest.skip(str(e))
    step = make_step(fwd, make_inputs(shape), mode)
    cuda = shape.device.startswith("cuda")

    def run():
        step()
        if cuda:
            torch.cuda.synchronize()

    benchmark.group = f"{encoding} {mode} L={shape.seqlen}"
    benchmark.extra_info.update(config=shape.config(), provider=name, flop=flops(shape, mode))
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2, iterations=1)
