"""Triton kernels for compressed-tensors ``pack-quantized`` int4 weights (W4A16), with checked launchers.

Weight format (SPEC sec. 5): ``packed`` int32 ``[N, K / 8]`` holding ``q + 8`` for ``q`` in [-8, 7],
column ``8k + j`` in bits ``4j..4j+3`` of word ``k``; ``scale`` bf16 ``[N, K / group]``;
``w = q * scale``.

- ``int4_weight_dequant``: the weight to bf16/fp16/fp32 (``int4_dequant_kernel``).
- ``int4_gemm``: ``x [M, K] @ w.T`` that unpacks nibbles in registers; fp32 accumulation, the group scale
  applied once per K step (``sum_k x q`` then ``* scale``), ragged M, N and K masked. Decode (M up to
  ``GEMV_MAX_M``) takes ``int4_gemv``, larger M the tl.dot kernel ``int4_gemm_kernel``, prefill in
  bf16/fp16 dequant + ``torch.matmul``.
- ``int4_gemv``: split-K GEMV for a few rows (``int4_gemv_kernel``, no tl.dot): each program reads its
  weight tile once for all rows, writes fp32 partials ``[SPLIT_K, M, N]`` that ``splitk_reduce_kernel``
  sums in a fixed order (deterministic: no atomics).

Launchers validate arguments (:mod:`dsv3tools.kernels.launch`) before launching. The pure-PyTorch twins
live in :mod:`dsv3tools.kernels.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3tools.kernels import launch
from dsv3tools.kernels.fp8 import INTERPRETED, exact_cast
from dsv3tools.quant.reference import cdiv


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
def nibble_f32(bits, SHIFT: tl.constexpr):
    """The nibble at bits SHIFT..SHIFT+3 of int32 ``bits`` (SHIFT <= 12), minus 8, as an exact fp32, without
    a shift or an int -> float conversion (a quarter-rate instruction on GPUs): with the exponent of
    ``2^(23 - SHIFT)`` OR-ed in, the nibble ``v`` lands on the units bit of the float ``2^(23 - SHIFT) + v``."""
    f = ((bits & (0xF << SHIFT)) | ((150 - SHIFT) << 23)).to(tl.float32, bitcast=True)
    return f - ((1 << (23 - SHIFT)) + 8.0)


@triton.jit
def unpack_q_f32(words):
    """int32 words ``[R, W]`` -> ``q = nibble - 8`` as fp32 ``[R, 8W]``, in ``unpack_nibbles``' column order.
    One shift per word (to the high half-word), then one mask-and-OR and one subtraction per value."""
    halves = tl.join(words, words >> 16)  # [R, W, 2]: nibble i of the halves is nibble i, 4 + i of the word
    shape: tl.constexpr = (words.shape[0], 2 * words.shape[1])
    n04 = tl.reshape(nibble_f32(halves, 0), shape)  # = tl.interleave(nibble 0, nibble 4)
    n15 = tl.reshape(nibble_f32(halves, 4), shape)
    n26 = tl.reshape(nibble_f32(halves, 8), shape)
    n37 = tl.reshape(nibble_f32(halves, 12), shape)
    return tl.interleave(tl.interleave(n04, n26), tl.interleave(n15, n37))


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


@triton.jit
def int4_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    p_ptr,
    N,
    K,
    KW,
    G,
    STEPS,
    ROWS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    INTERP: tl.constexpr,
):
    """P[pid_k, m, n] = sum over K slice pid_k (STEPS * BLOCK_K columns) of X[m, k] q[n, k] s[n, k // GROUP].

    Each step loads a [BLOCK_N, BLOCK_K / 8] tile of words once and serves all ROWS rows of X with it:
    ``sum_k x q`` in fp32 by multiply and ``tl.sum``, then ``* scale``, as the tl.dot kernel does per step.
    GROUP % BLOCK_K == 0, so K % BLOCK_K == 0: no K masks. KW = K // 8 is an argument so that Triton sees
    its divisibility and loads 16-byte vectors. Rows of N past the end wrap onto valid rows; the store is
    masked. P is fp32 partials, or the output itself when there is one slice.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)
    cols_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # [n, m]: the row sums keep their layout
    k_lo = pid_k * STEPS * BLOCK_K  # so Triton knows that k_lo // 8 is a multiple of BLOCK_K // 8
    k_hi = tl.minimum(k_lo + STEPS * BLOCK_K, K)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        words = tl.load(w_ptr + rn[:, None] * KW + (k0 // 8 + offs_w)[None, :])
        q = unpack_q_f32(words)
        s = tl.load(s_ptr + rn * G + k0 // GROUP).to(tl.float32)
        for m in tl.static_range(ROWS):
            x = tl.load(x_ptr + m * K + k0 + offs_k).to(tl.float32)
            part = tl.sum(q * x[None, :], axis=1) * s
            acc = tl.where(cols_m[None, :] == m, acc + part[:, None], acc)
    p_ptrs = p_ptr + (pid_k.to(tl.int64) * ROWS + cols_m[None, :]) * N + offs_n[:, None]
    mask = (offs_n[:, None] < N) & (cols_m[None, :] < ROWS)
    tl.store(p_ptrs, exact_cast(acc, p_ptr.dtype.element_ty, INTERP), mask=mask)


@triton.jit
def splitk_reduce_kernel(p_ptr, c_ptr, MN, SPLIT_K, BLOCK: tl.constexpr, INTERP: tl.constexpr):
    """C[i] = sum over s = 0, 1, ... SPLIT_K - 1 of P[s, i] in fp32, in that order; cast to C's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    p_ptrs = p_ptr + offs
    acc = tl.load(p_ptrs, mask=mask, other=0.0)
    for _ in range(1, SPLIT_K):
        p_ptrs += MN
        acc += tl.load(p_ptrs, mask=mask, other=0.0)
    tl.store(c_ptr + offs, exact_cast(acc, c_ptr.dtype.element_ty, INTERP), mask=mask)


DEQUANT_MATMUL_MIN_M = 128
"""Rows from which ``int4_gemm`` dequantizes the weight and calls ``torch.matmul`` (bf16/fp16 only)."""
GEMV_MAX_M = 4
"""Rows up to which ``int4_gemm`` takes the split-K GEMV ``int4_gemv`` (0: the tl.dot kernel at every M). On
an H200 the GEMV ran 2.8-3.5x the tl.dot kernel's speed at M = 1, 1.0-1.9x at M = 4 and 0.4-1.25x at M = 8
(``benchmarks/gpu_gemv_sweep.py``, benchmarks/RESULTS.md)."""
GEMV_ROWS_LIMIT = 16
"""Most rows ``int4_gemv`` accepts: its kernel unrolls the row loop (one compiled variant per row count)."""
GEMV_PROGRAMS_PER_SM = 2
"""The GEMV splits K until its grid holds this many programs per multiprocessor (2 was the fastest of 2, 4
and 8 on three of the four real shapes on an H200)..."""
GEMV_MAX_SLICE = 2048
"""... and until no slice holds more than this many K columns: a long serial loop per program left o_proj
(K = 16384, 3 slices at 2 per SM) at 0.050 ms against 0.037 ms with 10 slices."""
GEMV_TILE = 8192
"""BLOCK_N * BLOCK_K of the GEMV on a GPU (64 x 128 at group 128: 4 KiB of packed weight per step, two rows
per thread, so that each activation value read from shared memory serves two weight rows)."""
GEMV_INTERP_PROGRAMS = 16
"""The interpreter's stand-in for ``GEMV_PROGRAMS_PER_SM * SMs``, so that small test shapes split K."""
REDUCE_BLOCK = 1024
"""Outputs per program of ``splitk_reduce_kernel``."""


def _k_tile(group: int) -> int:
    """Largest power of two <= 128 dividing the group size (0 if below tl.dot's minimum of 16): the K step of
    the tl.dot kernel and of the GEMV, so that each step has one scale per row."""
    tile = 128
    while tile >= 16 and group % tile:
        tile //= 2
    return tile if tile >= 16 else 0


def gemv_tiles(m: int, n: int, k: int, group: int, interpreted: bool, sms: int = 1) -> dict[str, int]:
    """Tiles and K split of ``int4_gemv_kernel`` for an ``[m, k] x [n, k]^T`` product.

    BLOCK_K is the group's K tile (``_k_tile``: one scale per step), BLOCK_N = ``GEMV_TILE // BLOCK_K`` (32
    under the interpreter). K is cut into SPLIT_K slices of STEPS * BLOCK_K columns, a whole number of
    groups each: ``want`` slices of equal length, rounded up to whole groups (so the last may be shorter
    and SPLIT_K may come out below ``want``, never below half of it), where ``want`` is the fewest slices
    for which ``cdiv(n, BLOCK_N) * want`` programs reach ``GEMV_PROGRAMS_PER_SM * sms`` and no slice is
    longer than ``GEMV_MAX_SLICE`` columns, at most one per group.
    """
    block_k = _k_tile(group)
    if block_k == 0 or k <= 0 or k % group:
        raise launch.KernelLaunchError(f"no GEMV tiling for K={k} with group size {group}")
    block_n = 32 if interpreted else GEMV_TILE // block_k
    target = GEMV_INTERP_PROGRAMS if interpreted else GEMV_PROGRAMS_PER_SM * sms
    groups = k // group
    want = max(cdiv(target, max(1, cdiv(n, block_n))), 1 if interpreted else cdiv(k, GEMV_MAX_SLICE))
    per_slice = cdiv(groups, min(groups, want))
    return {
        "BLOCK_M": triton.next_power_of_2(m),
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "SPLIT_K": cdiv(groups, per_slice),
        "STEPS": per_slice * group // block_k,
        "NUM_STAGES": 3,
        "num_warps": 4,
    }


def _check_gemm(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int, out_dtype: torch.dtype | None
) -> tuple[int, int, int, torch.dtype]:
    """Arguments of ``int4_gemm`` / ``int4_gemv`` (device aside); return (N, K, group, out_dtype)."""
    n, k, group = launch.check_int4(packed, scale, None, group_size)
    launch.check_int4_x(x, k, packed)
    out_dtype = out_dtype or x.dtype
    if out_dtype not in launch.FLOAT_DTYPES:
        raise launch.KernelLaunchError(
            f"out_dtype {out_dtype} not supported; use bfloat16, float16 or float32"
        )
    return n, k, group, out_dtype


def _gemv(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """Launch the split-K GEMV (and, for SPLIT_K > 1, the reduction) on checked arguments."""
    (m, k), n = x.shape, packed.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if c.numel() == 0 or k == 0:
        return c.zero_()
    tiles = gemv_tiles(m, n, k, group, INTERPRETED, launch.sm_count(x.device))
    split = tiles.pop("SPLIT_K")
    part = c if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (cdiv(n, tiles["BLOCK_N"]), split)
    int4_gemv_kernel[grid](
        x, packed, scale, part, n, k, k // 8, scale.shape[1], ROWS=m, GROUP=group, INTERP=INTERPRETED, **tiles
    )
    if split > 1:
        grid = (cdiv(m * n, REDUCE_BLOCK),)
        splitk_reduce_kernel[grid](part, c, m * n, split, BLOCK=REDUCE_BLOCK, INTERP=INTERPRETED)
    return c


def int4_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    group_size: int = 128,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``int4_gemm`` for decode, always by the split-K GEMV: at most ``GEMV_ROWS_LIMIT`` rows of x and a
    group size that is a multiple of 16. fp32 accumulation, deterministic (no atomics)."""
    n, k, group, out_dtype = _check_gemm(x, packed, scale, group_size, out_dtype)
    if x.shape[0] > GEMV_ROWS_LIMIT:
        raise launch.KernelLaunchError(
            f"int4_gemv takes at most {GEMV_ROWS_LIMIT} rows, x has {x.shape[0]}; use int4_gemm"
        )
    if _k_tile(group) == 0:
        raise launch.KernelLaunchError(
            f"int4_gemv needs a group size that is a multiple of 16, got {group}; use int4_gemm"
        )
    launch.check_triton_device(x.device, INTERPRETED)
    return _gemv(x, packed, scale, group, out_dtype)


def int4_gemm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    group_size: int = 128,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W4A16 GEMM ``x [M, K] (bf16/fp16/fp32) @ (q * scale).T -> [M, N]`` in ``out_dtype`` (default x's).

    fp32 activations use IEEE fp32 dots (no TF32), so the result matches the float32 twin.
    Group sizes that are not a multiple of 16 fall back to Triton dequant + torch.matmul. Up to
    ``GEMV_MAX_M`` rows (decode) the split-K GEMV ``int4_gemv`` runs: tl.dot's 16-row minimum tile wastes
    most of the MMA there. From ``DEQUANT_MATMUL_MIN_M`` rows on (prefill), with bf16/fp16 in and out, the
    weight is dequantized once (``int4_weight_dequant``, 3-5 TB/s on an H200) and multiplied by
    ``torch.matmul``: the fused kernel reaches ~30 % of the bf16 matmul rate there, this route 77-85 %
    (benchmarks/RESULTS.md). It rounds ``q * scale`` to the activation dtype (as Marlin's in-register
    dequant does); the fused kernel and the GEMV apply the scale in fp32 after the sum.
    """
    n, k, group, out_dtype = _check_gemm(x, packed, scale, group_size, out_dtype)
    launch.check_triton_device(x.device, INTERPRETED)
    m = x.shape[0]
    block_k = _k_tile(group)
    if block_k == 0:
        w = int4_weight_dequant(packed, scale, (n, k), torch.float32)
        return (x.float() @ w.T).to(out_dtype)
    if m <= GEMV_MAX_M:
        return _gemv(x, packed, scale, group, out_dtype)
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
