"""Triton kernels for DeepSeek-V3's FP8 scheme, with checked launchers.

- ``act_quant``: activations to e4m3 in 1 x 128 groups along the last dim (``s = max(amax, 1e-4) / 448``,
  optional UE8M0 rounding of ``s`` up to a power of two), float32 scales ``[..., ceil(K / 128)]``.
- ``weight_dequant``: an e4m3 weight [N, K] with its 128 x 128 float32 scale grid to bf16/fp16/fp32
  (ragged last blocks, e.g. kv_a_proj_with_mqa's 576 rows, are masked).
- ``fp8_gemm``: ``a [M, K] x b [N, K]^T`` with fp32 accumulation; the activation and weight scales are
  applied once per 128-wide K step; ragged M, N and K are masked.

Each launcher validates its arguments (:mod:`dsv3tools.kernels.launch`) before anything is launched.
The pure-PyTorch twins with the same signatures live in :mod:`dsv3tools.kernels.reference`.
Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels take CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3tools.kernels import launch
from dsv3tools.quant.reference import cdiv


@triton.jit
def round_mantissa(x, DROP: tl.constexpr):
    """Round float32 ``x`` to nearest-even on ``23 - DROP`` mantissa bits (normal range); exact in fp32."""
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)
    return (bits & -(1 << DROP)).to(tl.float32, bitcast=True)


@triton.jit
def exact_cast(x, DTYPE: tl.constexpr, INTERP: tl.constexpr):
    """``x.to(DTYPE)``; with INTERP, round in fp32 bit arithmetic first so that the cast itself is exact.

    Triton's CPU interpreter (3.x) rounds float downcasts half-up without carrying into the exponent
    (e.g. 124.3 -> 64 in e4m3); INTERP is set under the interpreter. GPUs cast with RTNE natively.
    """
    if INTERP:
        if tl.float8e4nv == DTYPE:
            x = tl.minimum(tl.maximum(x, -448.0), 448.0)
            # e4m3 subnormals (|x| < 2^-6) have quantum 2^-9: RTNE via a magic-number add
            x = tl.where(tl.abs(x) < 0.015625, (x + 24576.0) - 24576.0, round_mantissa(x, 20))
        elif tl.bfloat16 == DTYPE:
            x = round_mantissa(x, 16)
        elif tl.float16 == DTYPE:
            x = round_mantissa(x, 13)
    return x.to(DTYPE)


@triton.jit
def act_quant_kernel(
    x_ptr,
    y_ptr,
    s_ptr,
    R,
    K,
    G,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UE8M0: tl.constexpr,
    INTERP: tl.constexpr,
):
    """One program quantizes BLOCK_R rows x one BLOCK_K group of a row-major [R, K] tensor."""
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_g * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
    s = tl.math.div_rn(amax, 448.0)
    if UE8M0:
        s = tl.math.exp2(tl.math.ceil(tl.math.log2(s)))
    y = tl.math.div_rn(x, s[:, None])
    tl.store(y_ptr + offs, exact_cast(y, y_ptr.dtype.element_ty, INTERP), mask=mask)
    tl.store(s_ptr + rows.to(tl.int64) * G + pid_g, s, mask=rows < R)


def act_quant(
    x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., K]`` (bf16/fp16/fp32, contiguous) to (e4m3 ``[..., K]``, float32 ``[..., ceil(K/bs)]``)."""
    launch.check_act_quant(x, block_size, scale_fmt)
    launch.check_fp8_device(x.device, INTERPRETED)
    k = x.shape[-1]
    r = x.numel() // k
    g = cdiv(k, block_size)
    y = torch.empty(x.shape, dtype=launch.FP8_DTYPE, device=x.device)
    s = torch.empty((*x.shape[:-1], g), dtype=torch.float32, device=x.device)
    if r == 0:
        return y, s
    block_r = 4 if INTERPRETED else max(1, min(16, 4096 // block_size))
    grid = (cdiv(r, block_r), g)
    act_quant_kernel[grid](
        x, y, s, r, k, g, BLOCK_R=block_r, BLOCK_K=block_size, UE8M0=scale_fmt == "ue8m0", INTERP=INTERPRETED
    )
    return y, s


@triton.jit
def weight_dequant_kernel(q_ptr, s_ptr, y_ptr, N, K, SK, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    """One program dequantizes one BLOCK x BLOCK tile (one scale) of a row-major [N, K] e4m3 weight."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + pid_n * SK + pid_k)
    tl.store(y_ptr + offs, exact_cast(q * s, y_ptr.dtype.element_ty, INTERP), mask=mask)


def weight_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``dtype(float32(q[i, j]) * s[i // 128, j // 128])`` for an e4m3 weight ``[N, K]``."""
    device = launch.check_weight_dequant(q, s, dtype)
    launch.check_fp8_device(device, INTERPRETED)
    n, k = q.shape
    y = torch.empty((n, k), dtype=dtype, device=q.device)
    if y.numel():
        grid = (s.shape[0], s.shape[1])
        weight_dequant_kernel[grid](q, s, y, n, k, s.shape[1], BLOCK=launch.BLOCK, INTERP=INTERPRETED)
    return y


@triton.jit
def fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_s_ptr,
    b_s_ptr,
    M,
    N,
    K,
    SK,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERP: tl.constexpr,
):
    """C[M, N] = A[M, K] B[N, K]^T; fp32 accumulator, per-step scales a_s[m, k//128] * b_s[n//128, k//128].

    BLOCK_K is 128: one scale step per iteration. Needs native e4m3 (sm_89+) or the interpreter.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rm = (offs_m % M).to(tl.int64)  # wrap out-of-range rows/cols onto valid ones; the store is masked
    rn = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + rn[None, :] * K + offs_k[:, None]
    a_s_ptrs = a_s_ptr + rm * SK
    b_s_ptrs = b_s_ptr + (rn // BLOCK_K) * SK
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - i * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        a_s = tl.load(a_s_ptrs + i)
        b_s = tl.load(b_s_ptrs + i)
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c = exact_cast(acc, c_ptr.dtype.element_ty, INTERP)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c_ptrs, c, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Block-scaled FP8 GEMM: ``a [M, K] e4m3`` with ``a_s [M, ceil(K/128)]`` times ``b [N, K] e4m3``
    with its grid ``b_s [ceil(N/128), ceil(K/128)]`` transposed; returns ``[M, N]`` in ``out_dtype``."""
    device = launch.check_fp8_gemm(a, a_s, b, b_s, out_dtype)
    launch.check_fp8_device(device, INTERPRETED)
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    tiles = launch.gemm_tiles(m, n, INTERPRETED, sms=launch.sm_count(device), fp8=True)
    grid = (cdiv(m, tiles["BLOCK_M"]), cdiv(n, tiles["BLOCK_N"]))
    fp8_gemm_kernel[grid](
        a,
        b,
        c,
        a_s,
        b_s,
        m,
        n,
        k,
        a_s.shape[1],
        BLOCK_K=launch.BLOCK,
        INTERP=INTERPRETED,
        **tiles,
    )
    return c


INTERPRETED: bool = type(act_quant_kernel).__name__ == "InterpretedFunction"
"""True when this module was imported with TRITON_INTERPRET=1 (the kernels then take CPU tensors)."""
