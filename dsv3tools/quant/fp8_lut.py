"""Exact FP8 block dequantization on CPU (the converters' and the CPU forward's hot path).

:func:`fp8_dequant_into` is the entry point. One table per 128x128 block, ``table[code] =
dtype(float32(code) * s)`` for the 256 e4m3 codes, is exact by construction (the same two IEEE roundings as
``quant.fp8_block_dequant``, NaN codes included), and a gather with ``index = code + 256 * block_col``
(uint16) then reads 1 byte and writes 2 (bf16) per element: 4-5x faster than the float formula on CPU,
with bit-identical results. Where the tables do not apply (more than 256 block columns) whole blocks take
one broadcast multiply, ragged ones the reference formula.
"""

from __future__ import annotations

import numpy as np
import torch

from dsv3tools.quant.reference import cdiv, fp8_block_dequant

_FP8_CODES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # every e4m3 value


def fp8_to_float32(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[:] = float32(q)`` for contiguous e4m3 codes through a 256-entry table (exact, NaN included;
    several times faster than torch's element-wise fp8 cast on CPU)."""
    np.take(_FP8_CODES.numpy(), q.contiguous().view(torch.uint8).numpy(), out=out.numpy())
    return out


_LUT_INT = {2: torch.int16, 4: torch.int32}
LUT_ROWS = 16  # rows per gather: the uint16 index chunk stays in cache


def fp8_dequant_lut(q: torch.Tensor, s: torch.Tensor, out: torch.Tensor, block: tuple[int, int]) -> bool:
    """``out[:] = out.dtype(float32(q) * s[i // b0, j // b1])`` through a 256-entry table per block.

    ``q`` starts on a block row; ragged last blocks are fine. Returns False (nothing written) when the
    table path does not apply: more than 256 block columns (uint16 index), an ``out`` that is not a
    contiguous bf16/f16/f32 tensor.
    """
    rows, cols = q.shape
    b0, b1 = block
    gr, gc = cdiv(rows, b0), cdiv(cols, b1)
    if gc > 256 or out.dtype not in (torch.bfloat16, torch.float16, torch.float32) or not out.is_contiguous():
        return False
    if q.numel() == 0:
        return True
    itype = _LUT_INT[out.element_size()]
    tables = (_FP8_CODES * s[:gr, :gc].float().unsqueeze(-1)).to(out.dtype).view(itype).numpy()
    offsets = (np.arange(cols, dtype=np.uint16) // b1) * np.uint16(256)
    codes = q.contiguous().view(torch.uint8).numpy()
    dst = out.view(itype).numpy()
    idx = np.empty((LUT_ROWS, cols), dtype=np.uint16)
    for bi in range(gr):
        table = tables[bi].reshape(-1)
        end = min(rows, (bi + 1) * b0)
        for r0 in range(bi * b0, end, LUT_ROWS):
            r1 = min(r0 + LUT_ROWS, end)
            ix = idx[: r1 - r0]
            np.add(codes[r0:r1], offsets, out=ix, dtype=np.uint16)
            np.take(table, ix, out=dst[r0:r1], mode="clip")  # indices are in range; "clip" skips buffering
    return True


def fp8_dequant_into(
    q: torch.Tensor,
    s: torch.Tensor,
    out: torch.Tensor,
    block: tuple[int, int],
    scratch: torch.Tensor | None = None,
) -> None:
    """``out[:] = out.dtype(float32(q) * s[i // b0, j // b1])`` (``q`` starts on a block row): the tables, else
    whole blocks use one broadcast multiply on a ``[gr, b0, gc, b1]`` view; ragged bands fall back
    to the reference formula. Both round once, from float32 to ``out.dtype``. ``scratch`` (float32,
    at least ``q.numel()`` elements) avoids allocating the float32 temporary.
    """
    if fp8_dequant_lut(q, s, out, block):
        return
    rows, cols = q.shape
    b0, b1 = block
    if rows % b0 or cols % b1:
        out.copy_(fp8_block_dequant(q, s, block, torch.float32))
        return
    gr, gc = rows // b0, cols // b1
    if out.dtype == torch.float32:
        tmp = out
    elif scratch is not None:
        tmp = scratch.view(-1)[: q.numel()].view(rows, cols)
    else:
        tmp = torch.empty((rows, cols), dtype=torch.float32)
    fp8_to_float32(q, tmp)
    tmp.view(gr, b0, gc, b1).mul_(s.view(gr, 1, gc, 1))
    if tmp is not out:
        out.copy_(tmp)
