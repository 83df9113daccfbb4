"""Pure-PyTorch quantization math: the reference formulas every converter, kernel twin and test uses.

FP8 block (DeepSeek-V3): ``w[i, j] = float(q[i, j]) * s[i // 128, j // 128]``; quantize with
``s = amax(block) / 448`` and ``q = e4m3(w / s)``. ``scale_fmt="ue8m0"`` rounds ``s`` up to a power of
two (DeepSeek-V3.1). int4 (compressed-tensors ``pack-quantized``): symmetric, ``scale = amax / 7.5`` per
group of ``group_size`` along the input dimension, ``q = clamp(round(w / scale), -8, 7)``, stored as
``q + 8`` nibbles, eight per int32 word, column ``8k + j`` in bits ``4j..4j+3`` of word ``k``.
All computation is float32; nothing here allocates more than a few copies of one tensor.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
INT4_MAX = 7.5
FP8_DTYPE = torch.float8_e4m3fn


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def scale_grid(shape: tuple[int, int] | torch.Size, block: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    """Shape of the block-scale tensor of an ``[out, in]`` weight (ragged last blocks included)."""
    return cdiv(shape[0], block[0]), cdiv(shape[1], block[1])


def expand_scale(
    s: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] = (128, 128)
) -> torch.Tensor:
    """Broadcast a block-scale grid to the full weight shape (float32), cropping ragged edges."""
    full = s.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[: shape[0], : shape[1]]


def fp8_block_dequant(
    q: torch.Tensor, s: torch.Tensor, block: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``dtype(float32(q) * s[i // b0, j // b1])`` for an FP8 weight and its scale grid."""
    if tuple(s.shape) != scale_grid(q.shape, block):
        raise ValueError(
            f"scale grid {tuple(s.shape)} does not match weight {tuple(q.shape)} with block {block}"
        )
    return (q.float() * expand_scale(s, tuple(q.shape), block)).to(dtype)


def round_scale_ue8m0(s: torch.Tensor) -> torch.Tensor:
    """Round positive float32 scales up to the next power of two (UE8M0 scale format)."""
    return torch.exp2(torch.ceil(torch.log2(s)))


def _block_view(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Zero-pad ``w`` to whole blocks and view it as ``[gr, b0, gc, b1]``."""
    rows, cols = w.shape
    gr, gc = scale_grid(w.shape, block)
    padded = torch.nn.functional.pad(w, (0, gc * block[1] - cols, 0, gr * block[0] - rows))
    return padded.view(gr, block[0], gc, block[1])


def fp8_block_quant(
    w: torch.Tensor, block: tuple[int, int] = (128, 128), scale_fmt: str = "float"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [out, in]`` to (e4m3 codes, float32 scale grid) by DeepSeek's recipe.

    ``s = amax(block) / 448`` computed in float32 (``ue8m0`` rounds it up to a power of two); an
    all-zero block gets ``s = 1 / 448`` instead of 0 so that its codes are zeros, not NaN.
    """
    if scale_fmt not in ("float", "ue8m0"):
        raise ValueError(f"unknown scale_fmt {scale_fmt!r}; use 'float' or 'ue8m0'")
    w = w.float()
    amax = _block_view(w, block).abs().amax(dim=(1, 3))
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    s = amax / torch.full_like(amax, FP8_MAX)  # an IEEE quotient on every device (see kernels.reference)
    if scale_fmt == "ue8m0":
        s = round_scale_ue8m0(s)
    q = (w / expand_scale(s, tuple(w.shape), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, s


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """Pack int values in [-8, 7] of shape ``[out, in]`` (``in % 8 == 0``) into int32 ``[out, in / 8]``."""
    out, cols = q.shape
    if cols % 8:
        raise ValueError(f"int4 packing needs the input dimension to be a multiple of 8, got {cols}")
    nib = (q.to(torch.int64) + 8).view(out, cols // 8, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    words = (nib << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # keep the bit pattern in int32
    return words.to(torch.int32)


def int4_unpack(packed: torch.Tensor, cols: int | None = None) -> torch.Tensor:
    """Inverse of :func:`int4_pack`: int8 values in [-8, 7] of shape ``[out, cols]``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nib = (packed.unsqueeze(-1) >> shifts) & 0xF
    q = (nib.to(torch.int8) - 8).reshape(packed.shape[0], -1)
    return q if cols is None else q[:, :cols]


def _int4_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, cols = w.shape
    if cols % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the input dimension {cols}")
    return w.float().view(out, cols // group_size, group_size)


def int4_quant(
    w: torch.Tensor, group_size: int = 128, method: str = "rtn", grid: int = 20, min_ratio: float = 0.75
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [out, in]`` to (int8 values in [-8, 7], bf16 scales ``[out, in / group_size]``).

    ``rtn``: ``scale = amax / 7.5``. ``mse``: per group, try clipping ratios ``c`` in
    ``[min_ratio, 1]`` (``grid`` steps) and keep the scale ``c * amax / 7.5`` with the smallest squared
    error. Codes are always computed against the bf16-rounded scale that is stored, so that
    ``q * scale`` is exactly what any reader reconstructs.
    """
    g = _int4_groups(w, group_size)
    amax = g.abs().amax(dim=-1, keepdim=True)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    if method == "rtn":
        ratios = [1.0]
    elif method == "mse":
        ratios = torch.linspace(1.0, min_ratio, grid).tolist()
    else:
        raise ValueError(f"unknown int4 method {method!r}; use 'rtn' or 'mse'")
    t = torch.empty_like(g)  # one reused temporary for the whole search
    best_scale = best_err = None
    for c in ratios:
        scale = (amax * c / INT4_MAX).to(torch.bfloat16).float()
        torch.div(g, scale, out=t).round_().clamp_(-8, 7).mul_(scale).sub_(g)
        err = t.mul_(t).sum(dim=-1, keepdim=True)
        if best_err is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_err = torch.where(better, err, best_err)
    q = torch.div(g, best_scale, out=t).round_().clamp_(-8, 7).to(torch.int8).view(w.shape)
    return q, best_scale.squeeze(-1).to(torch.bfloat16)


def int4_dequant(
    packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``dtype(q * scale)`` for a packed int4 weight of logical ``shape`` and its group scales."""
    out, cols = shape
    q = int4_unpack(packed, cols).float()
    group = cols // scale.shape[1]
    return (q.view(out, -1, group) * scale.float().unsqueeze(-1)).view(out, cols).to(dtype)
