"""Public entry points: validate once, resolve the encoding, dispatch to a backend.

Shapes and conventions (all backends):

* ``q``: ``(batch, seqlen_q, nheads, headdim)``; ``k``: ``(batch, seqlen_k, nheads_kv, headdim)``;
  ``v``: ``(batch, seqlen_k, nheads_kv, headdim_v)``; ``nheads % nheads_kv == 0`` (GQA/MQA: query
  head ``h`` reads kv head ``h // (nheads // nheads_kv)``). Any strides; inputs are never modified.
* Output: ``(batch, seqlen_q, nheads, headdim_v)`` in q's dtype.
* Positions: integer tensors ``(seqlen,)`` or ``(batch, seqlen)`` with values in ``[-2^62, 2^62)``
  (checked: on the host for CPU tensors, by an asynchronous device assert for CUDA tensors; the
  Triton kernels take ``[-2^30, 2^30)``). Defaults: ``k_positions = arange(Lk)``, ``q_positions =
  arange(Lk - Lq, Lk)`` (bottom-right aligned, as when decoding with a KV cache). Rotation angles are
  exact at every position (``encodings/angles.py``); ALiBi and TAPA distances ``|m - n|`` are exact
  integers, rounded once to float32 (float64 for float64 inputs).
* ``causal``: key ``n`` is visible to query ``m`` iff ``k_pos[n] <= q_pos[m]``; a query row that
  sees no key outputs zeros (and gets zero gradients), never NaN.
"""
from __future__ import annotations

import dataclasses
import numbers

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .encodings import Encoding, get_encoding
from .encodings.angles import check_positions_range
from .encodings.fope import FoPE

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Problem:
    """A validated attention call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    encoding: Encoding
    causal: bool
    softmax_scale: Optional[float]
    q_pos: torch.Tensor  # (Bp, Lq) int64
    k_pos: torch.Tensor  # (Bp, Lk) int64
    default_positions: bool = False  # both position tensors were defaulted (arange, bottom-right aligned)
    return_lse: bool = False  # the backend returns (out, lse): lse (B, H, Lq), natural log, -inf for empty rows
    # (B,) int32 on q's device, or None: key n of batch row b takes part only if n < k_lengths[b] (key padding:
    # the varlen and KV-cache entry points set it; values in [0, Lk], checked by whoever sets it)
    k_lengths: Optional[torch.Tensor] = None
    # (B,) int32 or None: query rows m >= q_lengths[b] are padding (their output is unspecified but finite); a
    # backend may skip them (run_by_rows does)
    q_lengths: Optional[torch.Tensor] = None
    num_splits: int = 1  # forward key ranges run by separate programs and merged (Triton's flash-decoding)
    # left padding: k_lengths counts the *last* keys (key n of row b takes part only if n >= Lk - k_lengths[b])
    k_padding_left: bool = False
    # (left, right) or None: key n is visible to query m only if q_pos[m] - left <= k_pos[n] <= q_pos[m] + right;
    # -1 = unbounded on that side, never both (that is None)
    window: Optional[tuple] = None
    softcap: Optional[float] = None  # > 0: the encoding's score s -> softcap * tanh(s / softcap) (ALiBi's bias after)

    @property
    def shape(self):
        b, lq, h, d = self.q.shape
        return b, lq, self.k.shape[1], h, self.k.shape[2], d, self.v.shape[3]


def _check_tensor(name: str, t, dims: str = "batch, seqlen, heads, headdim") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims.count(",") + 1:
        raise ValueError(f"{name} must have {dims.count(',') + 1} dims ({dims}), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _positions(name: str, pos, batch: int, seqlen: int, default_start: int, device) -> torch.Tensor:
    if pos is None:
        return torch.arange(default_start, default_start + seqlen, device=device)[None]
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor or None, got {type(pos).__name__}")
    check_int_tensor(name, pos, device)
    if pos.dim() == 1:
        pos = pos[None]
    if pos.dim() != 2 or pos.shape[1] != seqlen or pos.shape[0] not in (1, batch):
        raise ValueError(f"{name} must have shape ({seqlen},) or ({batch}, {seqlen}), got {tuple(pos.shape)}")
    check_positions_range(name, pos)
    return pos.to(torch.int64)


def _type_name(x) -> str:
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _as_bool(name: str, value) -> bool:
    """A Python bool, or a NumPy bool scalar (``np.True_``), as a bool."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {_type_name(value)}")


_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT32_TINY = 1.1754943508222875e-38  # smallest normal float32


def _check_float32_scale(softmax_scale, effective: float) -> None:
    """The kernels multiply scores by the scale in float32: it must be a normal float32 number (a subnormal
    one keeps a few bits at most, one below 1.4e-45 rounds to 0, one above 3.4e38 to inf)."""
    if not _FLOAT32_TINY <= effective <= _FLOAT32_MAX:
        what = f"softmax_scale={softmax_scale}" if softmax_scale is not None else "the default softmax scale"
        raise ValueError(f"{what} gives a score scale of {effective:g}, which float32 cannot represent as a normal "
                         f"number: it must lie in [{_FLOAT32_TINY:g}, {_FLOAT32_MAX:g}]")


def prepare(q, k, v, encoding, causal, softmax_scale, q_positions, k_positions, window_size=(-1, -1), softcap=None,
            k_lengths=None, padding_side="right") -> Problem:
    """Validate a call and return a :class:`Problem`; raises ``ValueError``/``TypeError`` naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q, k, v must be CPU or CUDA tensors, got device {q.device}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    b, lq, h, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q={b}, k={k.shape[0]}, v={v.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"k's headdim must equal q's ({d}), got {k.shape[3]}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have k's seqlen and heads {tuple(k.shape[1:3])}, got {tuple(v.shape[1:3])}")
    hkv = k.shape[2]
    if h % hkv:
        raise ValueError(f"nheads ({h}) must be divisible by nheads_kv ({hkv})")
    causal = _as_bool("causal", causal)
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale must be a real number or None, got {_type_name(softmax_scale)}")
        if not softmax_scale > 0 or softmax_scale == float("inf"):
            raise ValueError(f"softmax_scale must be a finite positive number, got {softmax_scale}")
        softmax_scale = float(softmax_scale)
    enc = resolve_encoding(encoding, d, h, q.device)
    enc.validate(d, h, hkv, b)
    _check_float32_scale(softmax_scale, enc.score_scale(d, softmax_scale))
    lk = k.shape[1]
    q_pos = _positions("q_positions", q_positions, b, lq, lk - lq, q.device)
    k_pos = _positions("k_positions", k_positions, b, lk, 0, q.device)
    window = check_window(window_size)
    softcap = check_softcap(softcap)
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' (k_lengths counts the first keys of each row) or 'left' (the "
                         f"last keys), got {padding_side!r}")
    lengths = None if k_lengths is None else check_lengths("k_lengths", k_lengths, b, lk, q.device)
    return Problem(q, k, v, enc, causal, softmax_scale, q_pos, k_pos,
                   default_positions=q_positions is None and k_positions is None, k_lengths=lengths,
                   k_padding_left=lengths is not None and padding_side == "left", window=window, softcap=softcap)


def check_int_tensor(name: str, t, device) -> torch.Tensor:
    """``t`` must be a signed integer tensor (on ``device`` unless ``None``); ``TypeError``/``ValueError`` naming
    ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype in (torch.bool, torch.uint64):  # uint64 would wrap in int64
        raise TypeError(f"{name} must be a signed integer tensor (int32/int64), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    return t


def check_lengths(name: str, lengths, batch: int, limit: int, device) -> torch.Tensor:
    """``(batch,)`` integer lengths in ``[0, limit]`` as int32 (values checked without a host-device sync:
    ``check_positions_range``)."""
    check_int_tensor(name, lengths, device)
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one length per batch row), got {tuple(lengths.shape)}")
    check_positions_range(name, lengths, 0, limit + 1, why=f"a row has {limit} keys")
    return lengths.to(torch.int32)


def check_window(window_size):
    """flash-attn's ``window_size=(left, right)`` (-1: unbounded) to ``Problem.window`` (``None``: no window)."""
    if isinstance(window_size, (str, bytes)) or not hasattr(window_size, "__len__") or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
    out = []
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window_size's {side} bound must be an int, got {_type_name(w)}")
        if w < -1:
            raise ValueError(f"window_size's {side} bound must be >= 0, or -1 for unbounded, got {int(w)}")
        out.append(int(w))
    return None if out == [-1, -1] else tuple(out)


def check_softcap(softcap):
    """``softcap``: ``None`` or 0 (flash-attn's "off") for no capping, else a positive finite float32 number."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a positive number or None, got {_type_name(softcap)}")
    if softcap == 0:
        return None
    if not _FLOAT32_TINY <= softcap <= _FLOAT32_MAX:
        raise ValueError(f"softcap must be a positive finite number that float32 represents (or None / 0 for no "
                         f"capping), got {softcap}")
    return float(softcap)


def resolve_encoding(encoding, head_dim: int, nheads: int, device=None) -> Encoding:
    """A name or instance to an instance. A name gives one canonical instance per name (built once: backends
    cache what they derive from an encoding per instance, so a new object per call would rebuild and re-copy
    it every call); ``"fope"`` by name is built for q's head dim and head count, once per device. The default
    ``REQUIRED`` (no encoding given) raises, naming the choices."""
    _require_encoding(encoding)
    if isinstance(encoding, str):
        key = encoding.lower()
        if key == "fope":
            if head_dim % 2 or head_dim < 4:
                raise ValueError(f"fope needs an even headdim >= 4, got headdim={head_dim}")
            return _default_fope(head_dim, nheads, torch.device("cpu") if device is None else torch.device(device))
        if key not in _CANONICAL:
            _CANONICAL[key] = get_encoding(key)  # raises for unknown names
        return _CANONICAL[key]
    return get_encoding(encoding)


# built at import, not on a first call that torch.compile may be tracing (an encoding made there gets a new id
# every call; ops/native.py finds encodings by id)
_CANONICAL: dict = {name: get_encoding(name) for name in ("none", "rope", "hope", "alibi", "tapa")}
_FOPE_CACHE: dict = {}


def _default_fope(head_dim: int, nheads: int, device: torch.device) -> FoPE:
    """The frozen FoPE of ``"fope"`` (fixed seed: every device gets the same coefficients), on ``device``."""
    key = (head_dim, nheads, str(device))
    if key not in _FOPE_CACHE:
        _FOPE_CACHE[key] = get_encoding("fope", head_dim=head_dim, num_heads=nheads).to(device)
    return _FOPE_CACHE[key]


LAYOUTS = ("bshd", "bhsd")


def _consistent(q, k, v) -> bool:
    """Whether q, k, v read as ``(batch, seqlen, heads, headdim)`` fit together (batch, headdim, GQA, v's shape)."""
    return (q.shape[0] == k.shape[0] == v.shape[0] and k.shape[3] == q.shape[3] and v.shape[1:3] == k.shape[1:3]
            and k.shape[2] > 0 and q.shape[2] % k.shape[2] == 0)


def _prepare_public(q, k, v, encoding, causal, softmax_scale, q_positions, k_positions, layout, dropout_p,
                    window_size=(-1, -1), softcap=None, k_lengths=None, padding_side="right"):
    """:func:`prepare` for the public entry points: ``dropout_p`` refused, ``layout="bhsd"`` read through transposed
    views (no copy), and a shape error in the default layout that the other layout explains says so."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a number, got {_type_name(dropout_p)}")
    if dropout_p != 0:
        raise NotImplementedError(f"dropout_p={dropout_p}: attention dropout is not supported (only dropout_p=0); "
                                  "apply dropout outside the attention")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} ('bshd': (batch, seqlen, heads, headdim), 'bhsd': "
                         f"(batch, heads, seqlen, headdim), as SDPA takes), got {layout!r}")
    four = all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v))
    if layout == "bhsd" and four:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    try:
        return prepare(q, k, v, encoding, causal, softmax_scale, q_positions, k_positions, window_size, softcap,
                       k_lengths, padding_side)
    except ValueError as e:
        if layout == "bshd" and four and not _consistent(q, k, v) and _consistent(*(t.transpose(1, 2) for t in (q, k, v))):
            raise ValueError(f"{e} (read as (batch, heads, seqlen, headdim) these shapes fit: pass layout='bhsd' if "
                             "that is how they are laid out)") from None
        raise


def _layout_out(res, layout: str, return_lse: bool):
    """The output in the caller's layout (a view); the lse is ``(batch, heads, seqlen_q)`` in both."""
    if layout == "bshd":
        return res
    if return_lse:
        return res[0].transpose(1, 2), res[1]
    return res.transpose(1, 2)


class _Required:
    """The default of ``encoding``: it must be given (a default RoPE would rotate already-rotated q and k)."""

    def __repr__(self):
        return "<required>"


REQUIRED = _Required()


def _require_encoding(encoding):
    if encoding is REQUIRED:
        from .encodings import NAMES

        raise TypeError(f"encoding is required: one of {list(NAMES)} or an Encoding instance (RoPE(...), FoPE(...), "
                        "...); pass encoding='none' for plain attention on q and k as they are")
    return encoding


_MASK_DOC = """window_size: ``(left, right)``, flash-attn's sliding window defined on positions: key ``n`` is
            visible to query ``m`` only if ``q_pos[m] - left <= k_pos[n] <= q_pos[m] + right``; -1 leaves that
            side unbounded (default ``(-1, -1)``: no window). With ``causal`` both rules apply (so ``right`` is
            moot). Tiles wholly outside the window are skipped.
        softcap: ``None`` or 0 (flash-attn's "off"): no capping; ``c > 0``: each score ``s`` becomes
            ``c * tanh(s / c)`` before the softmax. ``s`` is the encoding's score with the softmax scale applied
            (``scale * q.k`` after rotation; TAPA's whole ``amplitude * cos(phase)``); ALiBi's bias is added after
            the cap and is not capped (as in flash-attn). Exact gradients.
        k_lengths: ``(batch,)`` integer tensor on q's device, or ``None``: key padding. Row ``b`` uses only its
            ``k_lengths[b]`` keys: the first ones (``padding_side="right"``: pads at the end) or the last ones
            (``"left"``: left-padded prompts, as batched ``generate`` makes them). Values in ``[0, seqlen_k]``,
            checked on the host for CPU tensors and by a device assert on CUDA. Positions are not shifted: with
            left padding pass the real tokens' positions (for example Hugging Face's ``position_ids``). A query
            row that sees no key outputs zeros and gets zero gradients.
        padding_side: ``"right"`` (default) or ``"left"``: which keys ``k_lengths`` keeps."""


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, encoding: Union[str, Encoding] = REQUIRED,
                        *, causal: bool = False, softmax_scale: Optional[float] = None,
                        q_positions: Optional[torch.Tensor] = None,
                        k_positions: Optional[torch.Tensor] = None, return_lse: bool = False,
                        layout: str = "bshd", dropout_p: float = 0.0, window_size=(-1, -1),
                        softcap: Optional[float] = None, k_lengths: Optional[torch.Tensor] = None,
                        padding_side: str = "right"):
    """Plain-PyTorch attention with a positional encoding, materialising the scores (the oracle).

    Same arguments and conventions as :func:`fused_attention` (minus ``backend``). Runs in the
    inputs' dtype (use float64 inputs for a float64 oracle); differentiable w.r.t. q, k, v and the
    encoding's parameters. Memory is O(batch * nheads * seqlen_q * seqlen_k).
    """
    from .reference import attention_math

    p = _prepare_public(q, k, v, encoding, causal, softmax_scale, q_positions, k_positions, layout,
                        dropout_p, window_size, softcap, k_lengths, padding_side)
    return_lse = _as_bool("return_lse", return_lse)
    res = attention_math(p.q, p.k, p.v, p.encoding, p.causal, p.softmax_scale, p.q_pos, p.k_pos,
                         return_lse=return_lse, k_lengths=p.k_lengths, k_padding_left=p.k_padding_left,
                         window=p.window, softcap=p.softcap)
    return _layout_out(res, layout, return_lse)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, encoding: Union[str, Encoding] = REQUIRED,
                    *, causal: bool = False, softmax_scale: Optional[float] = None,
                    q_positions: Optional[torch.Tensor] = None, k_positions: Optional[torch.Tensor] = None,
                    backend: str = "auto", return_lse: bool = False, layout: str = "bshd", dropout_p: float = 0.0,
                    window_size=(-1, -1), softcap: Optional[float] = None, k_lengths: Optional[torch.Tensor] = None,
                    padding_side: str = "right"):
    """Exact attention with the positional encoding computed inside the kernel.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k: ``(batch, seqlen_k, nheads_kv, headdim)``, ``nheads % nheads_kv == 0``.
        v: ``(batch, seqlen_k, nheads_kv, headdim_v)``.
        encoding: required: ``"none" | "rope" | "hope" | "fope" | "alibi" | "tapa"`` or an instance
            (:class:`RoPE`, :class:`FoPE`, ...). ``"none"`` for q and k that are already encoded.
        causal: key ``n`` visible to query ``m`` iff ``k_pos[n] <= q_pos[m]``.
        softmax_scale: defaults to ``1/sqrt(headdim)`` (TAPA: multiplies its amplitude term).
        q_positions, k_positions: integer ``(seqlen,)`` or ``(batch, seqlen)``; defaults
            ``arange(Lk - Lq, Lk)`` and ``arange(Lk)``.
        backend: ``"auto"`` (the fastest available backend supporting the inputs; the environment
            variable ``FUSED_POSENC_BACKEND`` overrides it), ``"triton"``, ``"cuda"``, ``"cpu"`` or
            ``"torch"`` (the reference).
        return_lse: also return the log-sum-exp of each query row's scores (the softmax's normaliser).
        layout: ``"bshd"`` (the shapes above) or ``"bhsd"``: q, k, v (and the output) are ``(batch, heads,
            seqlen, headdim)`` as SDPA takes them, read through transposed views (no copy on the backends that
            take strides). In ``"bshd"``, a shape error that the other layout explains says so; shapes that fit
            both readings (self-attention with equal heads, or GQA with seqlen_q == seqlen_k) cannot be told apart.
        dropout_p: only 0 (no attention dropout); anything else raises ``NotImplementedError``.
        MASK_DOC

    Returns:
        ``out (batch, seqlen_q, nheads, headdim_v)`` in q's dtype; with ``return_lse``, ``(out, lse)``, ``lse
        (batch, nheads, seqlen_q)`` float32 (float64 for float64 inputs), natural log, ``-inf`` for a row that
        sees no key (its output is 0). The lse is differentiable on every backend (the fused ones spend one
        more backward pass on it when a loss reaches it). :func:`merge_attention_partials` combines results
        over disjoint key sets.
    """
    from .backends import select_backend

    p = _prepare_public(q, k, v, encoding, causal, softmax_scale, q_positions, k_positions, layout,
                        dropout_p, window_size, softcap, k_lengths, padding_side)
    return_lse = _as_bool("return_lse", return_lse)
    if return_lse:
        p = dataclasses.replace(p, return_lse=True)
    return _layout_out(select_backend(backend, p).run(p), layout, return_lse)


fused_attention.__doc__ = fused_attention.__doc__.replace("MASK_DOC", _MASK_DOC)


def merge_attention_partials(outs, lses):
    """Combine attention results over disjoint key sets into the result over their union.

    outs: sequence of ``(batch, seqlen_q, nheads, headdim_v)``; lses: matching ``(batch, nheads, seqlen_q)``
    (as :func:`fused_attention` returns them with ``return_lse=True``). Returns ``(out, lse)``:
    ``lse = logsumexp_i lse_i`` and ``out = sum_i exp(lse_i - lse) out_i`` (computed in float32, or float64
    for float64 lses; out in the dtype of ``outs[0]``). Rows with every ``lse_i = -inf`` give 0 and -inf.
    Differentiable (plain PyTorch).
    """
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"outs and lses must be non-empty and of one length, got {len(outs)} and {len(lses)}")
    for i, (o, l) in enumerate(zip(outs, lses)):
        if o.dim() != 4 or l.shape != (o.shape[0], o.shape[2], o.shape[1]):
            raise ValueError(f"outs[{i}] {tuple(o.shape)} and lses[{i}] {tuple(l.shape)} must be "
                             "(batch, seqlen_q, nheads, headdim_v) and (batch, nheads, seqlen_q)")
        if o.shape != outs[0].shape:
            raise ValueError(f"outs[{i}] has shape {tuple(o.shape)}, outs[0] {tuple(outs[0].shape)}")
    wd = torch.float64 if any(l.dtype == torch.float64 for l in lses) else torch.float32
    stack = torch.stack([l.to(wd) for l in lses])  # (n, B, H, Lq)
    lse = torch.logsumexp(stack, 0)
    w = torch.exp(stack - torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse))  # empty: 0
    out = sum(wi.transpose(1, 2)[..., None] * o.to(wd) for wi, o in zip(w, outs))
    return out.to(outs[0].dtype), lse
