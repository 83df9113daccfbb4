"""Pure-PyTorch twins of the Triton kernels: same signatures, same math, float32 arithmetic.

These are the ``backend="torch"`` implementations and the references the kernel tests compare
against. They reuse :mod:`dsv3tools.quant.reference` for the weight formats (FP8 128x128 block scales,
compressed-tensors int4) and run on any device. Arguments go through the same launcher checks as the
kernels, so a bad call fails the same way on both backends.
"""

from __future__ import annotations

import torch

from dsv3tools.kernels import launch
from dsv3tools.quant.reference import FP8_MAX, cdiv, fp8_block_dequant, int4_dequant, round_scale_ue8m0

AMAX_FLOOR = 1e-4


def act_quant(
    x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations in 1 x ``block_size`` groups along the last dim (DeepSeek's scheme).

    ``s = max(amax, 1e-4) / 448`` per group (``ue8m0`` rounds ``s`` up to a power of two),
    ``y = e4m3(x / s)``. A ragged last group is quantized on its own columns. Returns
    ``(y float8_e4m3fn [..., K], s float32 [..., ceil(K / block_size)])``.
    """
    launch.check_act_quant(x, block_size, scale_fmt)
    k = x.shape[-1]
    groups = cdiv(k, block_size)
    xf = x.float().reshape(-1, k)
    padded = torch.nn.functional.pad(xf, (0, groups * block_size - k)).view(-1, groups, block_size)
    amax = padded.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    # tensor / tensor: CUDA turns "tensor / python scalar" into a multiply by the rounded reciprocal, which
    # is 1 ulp off the IEEE quotient for some amax (the kernels and the CPU divide exactly)
    s = amax / torch.full_like(amax, FP8_MAX)
    if scale_fmt == "ue8m0":
        s = round_scale_ue8m0(s)
    y = (padded / s.unsqueeze(-1)).view(-1, groups * block_size)[:, :k].to(launch.FP8_DTYPE)
    return y.reshape(x.shape), s.reshape(*x.shape[:-1], groups)


def weight_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``dtype(float32(q[i, j]) * s[i // 128, j // 128])`` for an FP8 weight [N, K] (ragged edges ok)."""
    launch.check_weight_dequant(q, s, dtype)
    return fp8_block_dequant(q, s, dtype=dtype)


def expand_act_scale(a_s: torch.Tensor, k: int, block_size: int = 128) -> torch.Tensor:
    """Broadcast per-row group scales ``[M, ceil(K / block)]`` to ``[M, K]`` (float32)."""
    return a_s.float().repeat_interleave(block_size, dim=1)[:, :k]


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``out[m, n] = sum_k a[m,k] a_s[m,k//128] b[n,k] b_s[n//128,k//128]`` in float32, cast to ``out_dtype``.

    ``a`` fp8 [M, K] with ``a_s`` float32 [M, ceil(K/128)] (as :func:`act_quant` returns); ``b`` fp8
    [N, K] with its block grid ``b_s`` [ceil(N/128), ceil(K/128)].
    """
    launch.check_fp8_gemm(a, a_s, b, b_s, out_dtype)
    a32 = a.float() * expand_act_scale(a_s, a.shape[1])
    b32 = fp8_block_dequant(b, b_s, dtype=torch.float32)
    return (a32 @ b32.T).to(out_dtype)


def _int4_dequant(
    packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """:func:`dsv3tools.quant.reference.int4_dequant` on any device (``quant.int4_unpack`` builds its shifts on CPU)."""
    if packed.device.type == "cpu":
        return int4_dequant(packed, scale, shape, dtype=dtype)
    n, k = shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    q = (((packed.unsqueeze(-1) >> shifts) & 0xF) - 8).reshape(n, k).float()
    return (q.view(n, -1, k // scale.shape[1]) * scale.float().unsqueeze(-1)).view(n, k).to(dtype)


def int4_weight_dequant(
    packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``dtype(q * scale)`` for a compressed-tensors pack-quantized weight (int32 [N, K/8], scale [N, K/g])."""
    launch.check_int4(packed, scale, shape, None)
    return _int4_dequant(packed, scale, (int(shape[0]), int(shape[1])), dtype)


def int4_gemm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    group_size: int = 128,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W4A16: ``x [M, K] @ (q * scale).T`` in float32, cast to ``out_dtype`` (default ``x.dtype``)."""
    n, k, _ = launch.check_int4(packed, scale, None, group_size)
    launch.check_int4_x(x, k, packed)
    w = _int4_dequant(packed, scale, (n, k), torch.float32)
    return (x.float() @ w.T).to(out_dtype or x.dtype)
