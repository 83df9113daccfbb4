"""Triton kernels for compressed-tensors ``pack-quantized`` int4 weights (W4A16), with checked launchers.

Weight format (SPEC sec. 5): ``packed`` int32 ``[N, K / 8]`` holding ``q + 8`` for ``q`` in [-8, 7],
column ``8k + j`` in bits ``4j..4j+3`` of word ``k``; ``scale`` bf16 ``[N, K / group]``;
``w = q * scale``.

- ``int4_weight_dequant``: the weight to bf16/fp16/fp32 (``int4_dequant_kernel``).
- ``int4_gemm``: fused ``x [M, K] @ w.T`` that unpacks nibbles in registers; fp32 accumulation, the group
  scale applied once per K step (``sum_k x q`` then ``* scale``), ragged M, N and K masked.

Launchers validate arguments (:mod:`dsv3tools.kernels.launch`) before launching. The pure-PyTorch twins
live in :mod:`dsv3tools.kernels.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3tools.kernels import launch
from dsv3tools.kernels.fp8 import INTERPRETED, exact_cast
from dsv3tools.quant import cdiv


@triton.jit
def unpack_nibbles(words):
    """int32 words ``[R, W]`` -> their nibbles ``[R, 8W]`` in column order (column ``8w + j`` = bits ``4j..4j+3``
    of word ``w``), values 0..15. ``tl.interleave`` keeps the shuffle in registers (no shared-memory pass)."""
    n0 = words & 0xF
    n1 = (words >> 4) & 0xF
    n2 = (words >> 8) & 0xF
    n3 = (words >> 12) & 0xF
    n4 = (words >> 16) & 0xF
    n5 = (words >> 20) & 0xF
    n6 = (words >> 24) & 0xF
    n7 = (words >> 28) & 0xF
    even = tl.interleave(tl.interleave(n0, n4), tl.interleave(n2, n6))  # per word: j = 0, 2, 4, 6
    odd = tl.interleave(tl.interleave(n1, n5), tl.interleave(n3, n7))  # per word: j = 1, 3, 5, 7
    return tl.interleave(even, odd)


@triton.jit
def int4_dequant_kernel(
    w_ptr,
    s_ptr,
    y_ptr,
    N,
    K,
    G,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERP: tl.constexpr,
):
    """One program writes a BLOCK_N x BLOCK_K tile of the dequantized [N, K] weight (each word read once)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    wcols = pid_k * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    r64 = rows[:, None].to(tl.int64)
    wmask = (rows[:, None] < N) & (wcols[None, :] < K // 8)
    q = unpack_nibbles(tl.load(w_ptr + r64 * (K // 8) + wcols[None, :], mask=wmask, other=0)) - 8
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    if GROUP % BLOCK_K == 0:  # one scale per row in this tile
        s = tl.load(s_ptr + rows.to(tl.int64) * G + (pid_k * BLOCK_K) // GROUP, mask=rows < N, other=0.0)
        s = s.to(tl.float32)[:, None]
    else:
        s = tl.load(s_ptr + r64 * G + cols[None, :] // GROUP, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        y_ptr + r64 * K + cols[None, :],
        exact_cast(q.to(tl.float32) * s, y_ptr.dtype.element_ty, INTERP),
        mask=mask,
    )


def int4_weight_dequant(
    packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """``dtype(q * scale)`` for a pack-quantized weight of logical ``shape`` ``[N, K]``."""
    n, k, group = launch.check_int4(packed, scale, shape, None)
    if dtype not in launch.FLOAT_DTYPES:
        raise launch.KernelLaunchError(
            f"output dtype {dtype} not supported; use bfloat16, float16 or float32"
        )
    launch.check_triton_device(packed.device, INTERPRETED)
    y = torch.empty((n, k), dtype=dtype, device=packed.device)
    if y.numel():
        block_n, block_k = (16, 128) if INTERPRETED else (32, 128)
        grid = (cdiv(n, block_n), cdiv(k, block_k))
        int4_dequant_kernel[grid](
            packed,
            scale,
            y,
            n,
            k,
            scale.shape[1],
            GROUP=group,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            INTERP=INTERPRETED,
        )
    return y


@triton.jit
def int4_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    c_ptr,
    M,
    N,
    K,
    G,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    INTERP: tl.constexpr,
):
    """C[M, N] = X[M, K] (q[N, K] * s[N, K // GROUP])^T; GROUP % BLOCK_K == 0 so each step has one scale."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    rm = (offs_m % M).to(tl.int64)  # wrap out-of-range rows/cols onto valid ones; the store is masked
    rn = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + rm[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + rn[:, None] * (K // 8) + offs_w[None, :]  # [BLOCK_N, BLOCK_K / 8] words, row-major
    s_ptrs = s_ptr + rn * G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - i * BLOCK_K
        x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        words = tl.load(w_ptrs, mask=offs_w[None, :] * 8 < k_left, other=0)
        # [BLOCK_K, BLOCK_N]; via fp32: exact for |q| <= 8 (the interpreter mis-converts int -> bf16 directly)
        q = tl.trans((unpack_nibbles(words) - 8).to(tl.float32).to(x_ptr.dtype.element_ty))
        if INTERP:  # the interpreter multiplies bf16/fp16 bit patterns as integers: dot in fp32
            x = x.to(tl.float32)
            q = q.to(tl.float32)
        if IEEE:
            part = tl.dot(x, q, input_precision="ieee", out_dtype=tl.float32)
        else:
            part = tl.dot(x, q, out_dtype=tl.float32)
        s = tl.load(s_ptrs + (i * BLOCK_K) // GROUP).to(tl.float32)
        acc += part * s[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 8
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(
        c_ptrs,
        exact_cast(acc, c_ptr.dtype.element_ty, INTERP),
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


DEQUANT_MATMUL_MIN_M = 128
"""Rows from which ``int4_gemm`` dequantizes the weight and calls ``torch.matmul`` (bf16/fp16 only)."""


def _k_tile(group: int) -> int:
    """Largest power of two <= 128 dividing the group size (0 if below tl.dot's minimum of 16)."""
    tile = 128
    while tile >= 16 and group % tile:
        tile //= 2
    return tile if tile >= 16 else 0


def int4_gemm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    group_size: int = 128,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W4A16 GEMM ``x [M, K] (bf16/fp16/fp32) @ (q * scale).T -> [M, N]`` in ``out_dtype`` (default x's).

    fp32 activations use IEEE fp32 dots (no TF32), so the result matches the float32 twin.
    Group sizes that are not a multiple of 16 fall back to Triton dequant + torch.matmul. From
    ``DEQUANT_MATMUL_MIN_M`` rows on (prefill), with bf16/fp16 in and out, the weight is dequantized once
    (``int4_weight_dequant``, 3-5 TB/s on an H200) and multiplied by ``torch.matmul``: the fused kernel
    reaches ~30 % of the bf16 matmul rate there, this route 77-85 % (benchmarks/RESULTS.md). It rounds
    ``q * scale`` to the activation dtype (as Marlin's in-register dequant does); the fused kernel applies
    the scale in fp32 after the dot.
    """
    n, k, group = launch.check_int4(packed, scale, None, group_size)
    launch.check_int4_x(x, k, packed)
    out_dtype = out_dtype or x.dtype
    if out_dtype not in launch.FLOAT_DTYPES:
        raise launch.KernelLaunchError(
            f"out_dtype {out_dtype} not supported; use bfloat16, float16 or float32"
        )
    launch.check_triton_device(x.device, INTERPRETED)
    m = x.shape[0]
    block_k = _k_tile(group)
    if block_k == 0:
        w = int4_weight_dequant(packed, scale, (n, k), torch.float32)
        return (x.float() @ w.T).to(out_dtype)
    if m >= DEQUANT_MATMUL_MIN_M and x.dtype != torch.float32 and out_dtype == x.dtype:
        return torch.matmul(x, int4_weight_dequant(packed, scale, (n, k), x.dtype).T)
    c = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return c
    tiles = launch.gemm_tiles(m, n, INTERPRETED, fp32=x.dtype == torch.float32, sms=launch.sm_count(x.device))
    grid = (cdiv(m, tiles["BLOCK_M"]), cdiv(n, tiles["BLOCK_N"]))
    int4_gemm_kernel[grid](
        x,
        packed,
        scale,
        c,
        m,
        n,
        k,
        scale.shape[1],
        GROUP=group,
        BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32,
        INTERP=INTERPRETED,
        **tiles,
    )
    return c
