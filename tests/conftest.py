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
