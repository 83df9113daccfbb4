"""GGML block encoders in torch: pure functions from float32 values to the bytes of a GGUF tensor, equal
byte for byte to ``gguf.quants.quantize`` (the encoder llama.cpp's converter uses) for the same float32 input.

Types: F32, F16, BF16 and the 32-value block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1. A block type's row is a
sequence of blocks, each a float16 scale ``d`` (and for the ``_1`` types a float16 minimum ``m``), then its
codes. The arithmetic is gguf's, every step in float32 and in the same order (no fused multiply-add):

- Q8_0 (34 bytes): ``d = amax / 127``, ``id = 1 / d`` (0 where ``d`` is 0), code = ``x * id`` rounded half
  away from zero, as int8.
- Q4_0 / Q5_0 (18 / 22 bytes): ``max`` = the value of largest magnitude (the first one on a tie), ``d = max /
  -8`` (``-16``), code = ``trunc(x * id + 8.5)`` (``16.5``) clipped to 15 (31).
- Q4_1 / Q5_1 (20 / 24 bytes): ``d = (max - min) / 15`` (31), ``m = min``, code = ``trunc((x - min) * id + 0.5)``
  clipped to 15 (31).
- Nibbles: byte ``j`` holds code ``j`` in its low half and code ``j + 16`` in its high half; the 5-bit types
  store the codes' bit 4 as a little-endian 32-bit word (bit ``j`` from code ``j``) before the nibbles.
- BF16: round to nearest even on the float32 bits, a NaN made quiet with its sign and top mantissa bits kept.
- F16: IEEE float32 -> float16 (round to nearest even).

Half-away rounding is ``trunc(y + sign(y) * (0.5 - 2**-25))``: adding the largest float32 below one half
gives ``floor(|y| + 1/2)`` for every float32 ``y`` (an exact tie lands on the integer above, anything below
a tie stays below it; checked against gguf's five-step formula on every finite float32 of both signs), in
two passes instead of gguf's five.

Where a block's scale or its inverse is not finite (an inf or NaN in the input, or a subnormal ``d`` whose
inverse overflows), the float32 steps run into values whose integer conversion C leaves undefined; such an
input is encoded by ``gguf.quants`` itself, so the bytes still agree. These encoders run in torch's kernels
(vectorised, the GIL released), so several threads can encode at once."""

from __future__ import annotations

import math
import threading

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
BLOCK = 32
HALF_DOWN = 0.5 - 2**-25  # the largest float32 below 1/2 (exact in float32)
BLOCK_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
TYPES = (Q.F32, Q.F16, Q.BF16, *BLOCK_TYPES)
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)


def type_bytes(numel: int, qtype: Q) -> int:
    """Bytes of ``numel`` values (a whole number of rows) encoded as ``qtype``."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if numel % block:
        raise ValueError(f"{numel} values are not whole {qtype.name} blocks of {block}")
    return numel // block * size


def encode(x: torch.Tensor, qtype: Q) -> torch.Tensor:
    """The bytes (uint8, flat) of float32 ``x`` encoded as ``qtype``; ``x``'s last dimension is its rows'."""
    out = torch.empty(type_bytes(x.numel(), qtype), dtype=torch.uint8)
    encode_into(x, qtype, out)
    return out


def encode_into(x: torch.Tensor, qtype: Q, out: torch.Tensor) -> None:
    """Write the bytes of ``x`` encoded as ``qtype`` into ``out`` (contiguous uint8 of :func:`type_bytes`
    bytes, starting at an even address). ``x`` is float32, or bfloat16 / float16, encoded as the float32
    values it equals (converted first: torch's half-precision reductions are several times slower)."""
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"encode: float32, bfloat16 or float16 values expected, got {x.dtype}")
    x = x.contiguous()
    if out.numel() != type_bytes(x.numel(), qtype) or not out.is_contiguous():
        raise ValueError(f"encode: out must be {type_bytes(x.numel(), qtype)} contiguous bytes")
    x = x.float()
    if qtype == Q.F32:
        out.view(torch.float32).copy_(x.view(-1))
    elif qtype == Q.F16:
        _f16(x.view(-1), out)
    elif qtype == Q.BF16:
        _bf16(x.view(-1), out)
    elif qtype in _BLOCK_ENCODERS:
        blocks = x.view(-1, BLOCK)
        if not _BLOCK_ENCODERS[qtype](blocks, out.view(blocks.shape[0], -1), _Work(blocks.shape)):
            _reference(x, qtype, out)
    else:  # a type without a torch encoder here: gguf's own (which names any type it cannot write)
        _reference(x, qtype, out)


def _reference(x: torch.Tensor, qtype: Q, out: torch.Tensor) -> None:
    """gguf's own encoder, for the inputs the fast path leaves to it and the types it has no encoder for."""
    ref = gguf.quants.quantize(x.numpy().reshape(-1, gguf.GGML_QUANT_SIZES[qtype][0]), qtype)
    out.copy_(torch.from_numpy(np.ascontiguousarray(ref).reshape(-1).view(np.uint8)))


_local = threading.local()


class _Work:
    """This thread's scratch for one call, shaped like the blocks: two float32 arrays and one byte array,
    kept between calls (fresh multi-MB temporaries cost page faults on every call)."""

    def __init__(self, shape: torch.Size):
        n = shape[0] * shape[1]
        bufs = getattr(_local, "bufs", None)
        if bufs is None or bufs[0].numel() < n:
            bufs = _local.bufs = (torch.empty(n), torch.empty(n), torch.empty(n, dtype=torch.uint8))
        self.f0, self.f1 = (b[:n].view(shape) for b in bufs[:2])
        self.u0 = bufs[2][:n].view(shape)


def _inverse(d: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``1 / d``, 0 where ``d`` is 0, and whether every ``d`` and its inverse are finite (``d * id`` is then
    finite too; an infinite or NaN ``d``, or an inverse that overflows, makes some product inf or NaN)."""
    inv = torch.reciprocal(d)
    inv.masked_fill_(d == 0, 0.0)
    return inv, math.isfinite(float(torch.dot(d.view(-1), inv.view(-1))))


def _put_half(o: torch.Tensor, col: int, v: torch.Tensor) -> None:
    """Store float32 ``v`` (one per block) as float16 at byte ``col`` (even) of each block row of ``o``."""
    o.view(torch.int16)[:, col // 2].copy_(v.view(-1).to(torch.float16).view(torch.int16))


def _q8_0(b: torch.Tensor, o: torch.Tensor, w: _Work) -> bool:
    d = torch.abs(b, out=w.f0).amax(dim=1, keepdim=True).div_(127)
    inv, ok = _inverse(d)
    if not ok:
        return False
    y = torch.mul(b, inv, out=w.f0)
    y.add_(torch.sgn(b, out=w.f1), alpha=HALF_DOWN)  # sign(y) = sign(b); the product is exact, fused or not
    o[:, 2:].view(torch.int8).copy_(y)  # float -> int truncates toward zero
    _put_half(o, 0, d)
    return True


def _codes(y: torch.Tensor, top: int, w: _Work) -> torch.Tensor:
    """``trunc(y)`` of non-negative ``y`` as uint8, clipped to ``top``."""
    return w.u0.copy_(y).clamp_(max=top)


def _pack(q: torch.Tensor, o: torch.Tensor, col: int, five_bits: bool) -> None:
    """From byte ``col`` of each block row of ``o``: for 5-bit codes their bit 4 as a little-endian 32-bit
    word (bit ``j`` from code ``j``), then 16 bytes, byte ``j`` holding code ``j`` in its low half and code
    ``j + 16`` in its high half. Overwrites ``q``."""
    half = BLOCK // 2
    if five_bits:
        bits = (q >> 4).view(q.shape[0], 4, 8).mul_(_BIT_WEIGHTS)
        o[:, col : col + 4].copy_(bits.sum(dim=2, dtype=torch.uint8))
        col += 4
    lo, hi = q[:, :half].bitwise_and_(15), q[:, half:].bitwise_left_shift_(4)
    torch.bitwise_or(lo, hi, out=o[:, col : col + half])


def _q_sym(b: torch.Tensor, o: torch.Tensor, w: _Work, levels: int) -> bool:
    """Q4_0 (16 levels) / Q5_0 (32 levels)."""
    big = torch.abs(b, out=w.f0).argmax(dim=1, keepdim=True)  # the first of equal magnitudes
    d = b.gather(1, big).div_(-(levels // 2))
    inv, ok = _inverse(d)
    if not ok:
        return False
    y = torch.mul(b, inv, out=w.f0).add_(levels // 2 + 0.5)
    _put_half(o, 0, d)
    _pack(_codes(y, levels - 1, w), o, 2, levels == 32)
    return True


def _q_affine(b: torch.Tensor, o: torch.Tensor, w: _Work, levels: int) -> bool:
    """Q4_1 (16 levels) / Q5_1 (32 levels)."""
    lo, hi = b.amin(dim=1, keepdim=True), b.amax(dim=1, keepdim=True)  # (aminmax is several times slower)
    d = (hi - lo).div_(levels - 1)
    inv, ok = _inverse(d)
    if not ok:
        return False
    y = torch.sub(b, lo, out=w.f0).mul_(inv).add_(0.5)
    _put_half(o, 0, d)
    _put_half(o, 2, lo)
    _pack(_codes(y, levels - 1, w), o, 4, levels == 32)
    return True


_BLOCK_ENCODERS = {
    Q.Q8_0: _q8_0,
    Q.Q4_0: lambda b, o, w: _q_sym(b, o, w, 16),
    Q.Q5_0: lambda b, o, w: _q_sym(b, o, w, 32),
    Q.Q4_1: lambda b, o, w: _q_affine(b, o, w, 16),
    Q.Q5_1: lambda b, o, w: _q_affine(b, o, w, 32),
}


def _has_nan(v: torch.Tensor) -> bool:
    """Whether ``v`` holds a NaN: its sum is finite when it holds none and nothing overflows."""
    return not math.isfinite(float(v.sum(dtype=torch.float32))) and bool(torch.isnan(v).any())


def _f16(x: torch.Tensor, out: torch.Tensor) -> None:
    """IEEE float16 (numpy and torch round alike); NaNs go through numpy, whose payload rule gguf uses."""
    h = out.view(torch.float16)
    h.copy_(x)
    if _has_nan(x):
        h.copy_(torch.from_numpy(x.numpy().astype(np.float16)))


def _bf16(x: torch.Tensor, out: torch.Tensor) -> None:
    """bfloat16: torch's rounding (nearest even) unless there is a NaN, then gguf's rule on the bits."""
    out.view(torch.bfloat16).copy_(x)
    if not _has_nan(x):
        return
    n = x.view(torch.int32)
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = torch.where(nan, (n & -65536) | (64 << 16), n)  # quiet: keep sign and the top mantissa bits
    r = (n + 0x7FFF + ((n >> 16) & 1)) >> 16  # no int32 overflow: see the module doc's BF16 rule
    out.view(torch.int16).copy_(r)
