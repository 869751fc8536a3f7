"""The ``"cpu"`` and ``"cuda"`` backends: the C++/CUDA extension ``fused_posenc._C``."""
from __future__ import annotations


def _extension():
    try:
        from .. import _C  # noqa: F401
        return _C, ""
    except ImportError as e:  # not built
        return None, f"the C++/CUDA extension fused_posenc._C is not built ({e})"


class NativeBackend:
    def __init__(self, name: str):
        self.name = name

    def available(self):
        ext, why = _extension()
        if ext is None:
            return False, why
        if self.name == "cuda" and not getattr(ext, "has_cuda", lambda: False)():
            return False, "the extension was built without CUDA"
        return True, ""

    def supports(self, problem):
        want_cuda = self.name == "cuda"
        if problem.q.is_cuda != want_cuda:
            return False, f"backend {self.name!r} needs {'CUDA' if want_cuda else 'CPU'} tensors, got {problem.q.device}"
        return True, ""

    def run(self, p):
        from ..ops.native import native_attention

        return native_attention(p, self.name)
