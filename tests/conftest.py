"""Test session setup. Without a CUDA device, Triton kernels run on the CPU interpreter: the switch
must be set before any Triton kernel is defined, so it is set here, before the package is imported."""
import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# under pytest-xdist (scripts/test.sh runs one worker per core), each worker's torch gets its share of the cores:
# two workers of two threads each on two cores spend their time switching
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _WORKERS > 1 and not _HAS_CUDA:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
