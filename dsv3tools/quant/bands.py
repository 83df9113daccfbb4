"""The numerics of ``convert``, applied in bands of rows so that peak memory is one output tensor plus
a few band-sized temporaries: read a linear's float32 source weight (fp8 dequantized in float32, bf16,
or int4 dequantized), and encode it as bf16, fp8 blocks or packed int4. Every encoder works on bands
whose row counts are multiples of the block/group structure, so the result is bit-identical to the
whole-tensor reference formulas of ``dsv3tools.quant.reference`` (blocks and groups never straddle bands).

FP8 dequantization (the hot path of fp8 -> bf16) is ``dsv3tools.quant.fp8_lut``'s."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from dsv3tools.quant.fp4 import mxfp4_dequant, nvfp4_dequant
from dsv3tools.quant.fp8_lut import fp8_dequant_into, fp8_dequant_lut
from dsv3tools.quant.reference import INT4_MAX, cdiv, fp8_block_quant, int4_quant, int4_unpack

BAND_ELEMENTS = 1 << 22  # about 16 MB of float32 per band
Getter = Callable[[str], torch.Tensor]


def bands(rows: int, cols: int, align: int = 128) -> Iterator[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` of about BAND_ELEMENTS elements, each a multiple of ``align`` rows."""
    step = max(align, (BAND_ELEMENTS // max(cols, 1)) // align * align)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


class SourceWeight:
    """A quantizable linear as stored (``fp8``, ``bf16``/``fp16``, ``int4``, ``nvfp4`` or ``mxfp4``), readable
    as float32 bands."""

    def __init__(self, get: Getter, prefix: str, fmt: str, shape: tuple[int, int], block: tuple[int, int]):
        self.prefix, self.fmt, self.shape, self.block = prefix, fmt, shape, block
        if fmt == "fp8":
            self.q, self.s = get(f"{prefix}.weight"), get(f"{prefix}.weight_scale_inv")
        elif fmt in ("bf16", "fp16"):
            self.w = get(f"{prefix}.weight")
        elif fmt in ("int4", "nvfp4", "mxfp4"):
            self.packed, self.scale = get(f"{prefix}.weight_packed"), get(f"{prefix}.weight_scale")
            self.group = shape[1] // self.scale.shape[1]
            self.global_scale = get(f"{prefix}.weight_global_scale") if fmt == "nvfp4" else None
        else:
            raise ValueError(f"unknown source format {fmt!r}")

    def band(self, r0: int, r1: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``r0:r1`` of the weight in float32 (``r0`` a multiple of the block height); written into
        ``scratch`` (float32, large enough) when given."""
        rows, cols = r1 - r0, self.shape[1]
        out = scratch.view(-1)[: rows * cols].view(rows, cols) if scratch is not None else None
        if self.fmt == "fp8":
            out = torch.empty((rows, cols), dtype=torch.float32) if out is None else out
            b0 = self.block[0]
            fp8_dequant_into(self.q[r0:r1], self.s[r0 // b0 : cdiv(r1, b0)], out, self.block)
            return out
        if self.fmt in ("bf16", "fp16"):
            return self.w[r0:r1].float() if out is None else out.copy_(self.w[r0:r1])
        if self.fmt == "nvfp4":
            w = nvfp4_dequant(self.packed[r0:r1], self.scale[r0:r1], self.global_scale, torch.float32)
            return w if out is None else out.copy_(w)
        if self.fmt == "mxfp4":
            w = mxfp4_dequant(self.packed[r0:r1], self.scale[r0:r1], torch.float32)
            return w if out is None else out.copy_(w)
        q = int4_unpack(self.packed[r0:r1], cols).float()
        w = (q.view(rows, -1, self.group) * self.scale[r0:r1].float().unsqueeze(-1)).view(rows, cols)
        return w if out is None else out.copy_(w)

    def to_bf16(self, out: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The bf16 weight: one float32 -> bf16 rounding of the float32 source."""
        if self.fmt == "bf16" and self.w.dtype == torch.bfloat16:
            return self.w
        out = torch.empty(self.shape, dtype=torch.bfloat16) if out is None else out
        if self.fmt == "fp8" and fp8_dequant_lut(self.q, self.s, out, self.block):
            return out
        for r0, r1 in bands(*self.shape, self.block[0]):
            if self.fmt == "fp8":
                b0 = self.block[0]
                fp8_dequant_into(
                    self.q[r0:r1], self.s[r0 // b0 : cdiv(r1, b0)], out[r0:r1], self.block, scratch
                )
            else:
                out[r0:r1].copy_(self.band(r0, r1, scratch))
        return out


def encode_fp8(
    src: SourceWeight, scale_fmt: str, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's recipe per block: ``s = amax / 448`` (ue8m0: a power of two), ``q = e4m3(w / s)``."""
    rows, cols = src.shape
    q = torch.empty(src.shape, dtype=torch.float8_e4m3fn)
    s = torch.empty((cdiv(rows, block[0]), cdiv(cols, block[1])), dtype=torch.float32)
    for r0, r1 in bands(rows, cols, math.lcm(block[0], src.block[0])):
        qb, sb = fp8_block_quant(src.band(r0, r1), block, scale_fmt)
        q[r0:r1] = qb
        s[r0 // block[0] : cdiv(r1, block[0])] = sb
    return q, s


def int4_rtn_packed(w: torch.Tensor, group: int, packed: torch.Tensor, scale: torch.Tensor) -> None:
    """``int4_quant(w, group, "rtn")`` then ``int4_pack``, bit for bit, with in-place ops: nibble pairs
    are or-ed into bytes, and four little-endian bytes are the int32 word (column 8k+j -> bits 4j..)."""
    rows, cols = w.shape
    g = w.view(rows, cols // group, group)
    amax = g.abs().amax(dim=-1, keepdim=True)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    sc = (amax / INT4_MAX).to(torch.bfloat16).float()
    u = torch.div(g, sc).round_().clamp_(-8, 7).add_(8).to(torch.uint8).view(rows, cols // 2, 2)
    packed.view(torch.uint8).view(rows, cols // 2).copy_(torch.bitwise_or(u[..., 0], u[..., 1] << 4))
    scale.copy_(sc.view(rows, -1))


def pack_into(q: torch.Tensor, packed: torch.Tensor) -> None:
    """``int4_pack(q)`` written into ``packed`` (int32), through bytes as in :func:`int4_rtn_packed`."""
    rows, cols = q.shape
    u = (q + 8).to(torch.uint8).view(rows, cols // 2, 2)
    packed.view(torch.uint8).view(rows, cols // 2).copy_(torch.bitwise_or(u[..., 0], u[..., 1] << 4))


def encode_int4(
    src: SourceWeight, group: int, method: str, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors pack-quantized: (int32 ``[out, in/8]`` nibbles, bf16 ``[out, in/group]`` scales)."""
    rows, cols = src.shape
    packed = torch.empty((rows, cols // 8), dtype=torch.int32)
    scale = torch.empty((rows, cols // group), dtype=torch.bfloat16)
    for r0, r1 in bands(rows, cols, src.block[0]):
        w = src.band(r0, r1, scratch)
        if method == "rtn":
            int4_rtn_packed(w, group, packed[r0:r1], scale[r0:r1])
        else:
            qb, sb = int4_quant(w, group, "mse")
            pack_into(qb, packed[r0:r1])
            scale[r0:r1] = sb
    return packed, scale


def rel_error(src: SourceWeight, out: SourceWeight) -> float:
    """``||w' - w|| / ||w||`` in float64 (``w`` the float32 source weight, ``w'`` the converted one)."""
    num = den = 0.0
    align = math.lcm(src.block[0], out.block[0])
    for r0, r1 in bands(*src.shape, align):
        w = src.band(r0, r1).double()
        num += float(((out.band(r0, r1).double() - w) ** 2).sum())
        den += float((w**2).sum())
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))
