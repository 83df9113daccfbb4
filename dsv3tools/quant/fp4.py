"""FP4 (E2M1) weight formulas of compressed-tensors' ``nvfp4-pack-quantized`` and ``mxfp4-pack-quantized``
W4A16 formats, as its NVFP4A16 / MXFP4A16 presets write them and its decompressors read them back.

E2M1 values are 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives; a code is the magnitude's index (0..7) with
the sign in bit 3, two codes per byte, column ``2k`` in the low nibble of byte ``k``. Rounding is to the
nearest value, ties to the even code (compressed-tensors' ``cast_to_fp4`` thresholds), after clamping
to [-6, 6]; the sign bit is set for negative scaled values (a tiny negative rounds to code 8, -0; a
zero, -0.0 included, is code 0).

NVFP4 (groups of 16 along the input dimension): a float32 per-tensor ``global_scale = 448 * 6 / amax``
(``amax`` of the tensor, or of the tensors vLLM fuses into one layer), group scales
``s = e4m3(global_scale * amax_g / 6)`` (0 becomes 0.125), codes of ``w / (s / global_scale)``;
dequantization is ``dtype(fp4 * (float32(s) / global_scale))``. The amax values and the quotients
``448 * 6 / amax`` and ``amax_g / 6`` are rounded to bf16 as compressed-tensors' observers compute them
on bf16 weights, so a bf16 source gives llm-compressor's bytes; the weights themselves are divided in float32.

MXFP4 (groups of 32): the (bf16) group amax rounded to a power of two (up when its mantissa is >= 1.75), an
e8m0 exponent ``e = 127 + log2(that) - 2`` stored as uint8 (an all-zero group gets 127), codes of
``w / 2 ** (e - 127)``; dequantization is ``dtype(fp4 * bf16(2 ** (e - 127)))``.

Everything is float32 (the float64 references in the tests check it); no function allocates more than a
few copies of its input.
"""

from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MAX = 6.0
FP8_MAX = 448.0
NVFP4_GROUP = 16
MXFP4_GROUP = 32
NVFP4_ZERO_SCALE = 0.125  # compressed-tensors' replacement for a zero e4m3 group scale
MX_ZERO_EXPONENT = 127  # an all-zero MXFP4 group: scale 1
OBSERVE_DTYPE = torch.bfloat16  # the dtype llm-compressor's observers derive scales in (its weights' dtype)
_E2M1 = torch.tensor(E2M1_VALUES, dtype=torch.float32)
_SIGNED_E2M1 = torch.cat([_E2M1, -_E2M1])  # value of each 4-bit code


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8, 0..15) of ``x`` clamped to [-6, 6] and rounded to the nearest E2M1 value
    (ties to even: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4)."""
    a = x.abs()
    idx = (a > 0.25).to(torch.uint8)
    for t, strict in ((0.75, False), (1.25, True), (1.75, False), (2.5, True), (3.5, False), (5.0, True)):
        idx += (a > t) if strict else (a >= t)
    return idx | ((x < 0).to(torch.uint8) << 3)


def fp4_pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[out, in]`` (``in`` even) -> bytes ``[out, in / 2]``, column ``2k`` in the low nibble."""
    rows, cols = codes.shape
    if cols % 2:
        raise ValueError(f"FP4 packing needs an even input dimension, got {cols}")
    pairs = codes.view(rows, cols // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def fp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Bytes ``[out, in / 2]`` -> float32 E2M1 values ``[out, in]``."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)
    return _SIGNED_E2M1.to(packed.device)[codes.long()]


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    rows, cols = w.shape
    if cols % group:
        raise ValueError(f"FP4 group size {group} does not divide the input dimension {cols}")
    return w.float().view(rows, cols // group, group)


def nvfp4_global_scale(amax: float | torch.Tensor) -> torch.Tensor:
    """float32 ``[1]``: ``448 * 6 / amax`` computed in bf16 from the bf16-rounded amax (amax clamped to
    the smallest normal; 1 where the quotient is not finite): compressed-tensors' ``generate_gparam`` on
    the bf16 weights llm-compressor observes."""
    a = torch.as_tensor(amax, dtype=torch.float32).reshape(1).to(OBSERVE_DTYPE)
    a = a.clamp(min=torch.finfo(OBSERVE_DTYPE).tiny)
    g = (FP8_MAX * FP4_MAX) / a
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).float()


def nvfp4_quant(w: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` -> (packed uint8 ``[out, in / 2]``, e4m3 scales ``[out, in / 16]``) against the
    given float32 global scale (``nvfp4_global_scale`` of the tensor's, or its fused group's, amax)."""
    g = _groups(w, NVFP4_GROUP)
    gs = global_scale.float().reshape(())
    amax = g.abs().amax(dim=-1).to(OBSERVE_DTYPE)
    s = (gs * (amax / FP4_MAX).float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    s = torch.where(s == 0, torch.full_like(s, NVFP4_ZERO_SCALE), s)
    eff = (s / gs).unsqueeze(-1)
    codes = e2m1_codes(torch.div(g, eff).clamp_(-FP4_MAX, FP4_MAX)).view(w.shape)
    return fp4_pack(codes), s.to(torch.float8_e4m3fn)


def nvfp4_dequant(
    packed: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``dtype(fp4 * (float32(scale) / global_scale))`` ``[out, in]``."""
    v = fp4_unpack(packed)
    rows, cols = v.shape
    eff = scale.float() / global_scale.float().reshape(())
    return (v.view(rows, -1, NVFP4_GROUP) * eff.unsqueeze(-1)).view(rows, cols).to(dtype)


def mx_exponents(amax: torch.Tensor) -> torch.Tensor:
    """e8m0 exponents (uint8) of MXFP4 group scales from float32 group amax values."""
    bits = amax.float().contiguous().view(torch.int32)
    p2 = ((bits + (1 << 21)) & 0x7F800000).view(torch.float32)  # round to a power of two, up from 1.75
    e = torch.floor(torch.log2(p2)) + (127 - 2)
    e = torch.where(p2 > 0, e, torch.full_like(e, MX_ZERO_EXPONENT))
    return e.clamp(0, 254).to(torch.uint8)


def mx_scale_values(exponents: torch.Tensor) -> torch.Tensor:
    """``bf16(2 ** (e - 127))`` for e8m0 exponents, as compressed-tensors decompresses them."""
    return torch.exp2(exponents.float() - 127).to(torch.bfloat16)  # powers of two: exact in bf16


def mxfp4_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` -> (packed uint8 ``[out, in / 2]``, e8m0 exponents uint8 ``[out, in / 32]``)."""
    g = _groups(w, MXFP4_GROUP)
    e = mx_exponents(g.abs().amax(dim=-1).to(OBSERVE_DTYPE).float())
    s = torch.exp2(e.float() - 127).unsqueeze(-1)
    codes = e2m1_codes(torch.div(g, s).clamp_(-FP4_MAX, FP4_MAX)).view(w.shape)
    return fp4_pack(codes), e


def mxfp4_dequant(
    packed: torch.Tensor, exponents: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``dtype(fp4 * 2 ** (e - 127))`` ``[out, in]``."""
    v = fp4_unpack(packed)
    rows, cols = v.shape
    s = mx_scale_values(exponents).float().unsqueeze(-1)
    return (v.view(rows, -1, MXFP4_GROUP) * s).view(rows, cols).to(dtype)
