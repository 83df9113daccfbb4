"""Tests for dsv3tools.kernels: Triton kernels vs their PyTorch twins vs float64 math, launcher checks.

Triton decides at import time whether its kernels run in the CPU interpreter, so every check that
launches a kernel runs in a fresh subprocess with ``TRITON_INTERPRET=1`` (``python tests/test_kernels.py
GROUP``); the parent pytest process only runs twins, launcher checks and backend resolution. Inputs
are fresh random tensors each run; every failure message carries the seed (rerun a group with
``KERNEL_TEST_SEED=<seed>``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3tools.errors import DSV3Error
from dsv3tools.kernels import dispatch, launch
from dsv3tools.kernels import reference as ref
from dsv3tools.quant import reference as quant

ROOT = Path(__file__).resolve().parents[1]
FP8 = torch.float8_e4m3fn


def new_seed() -> int:
    return int(os.environ.get("KERNEL_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian values with a random magnitude per row and a few outliers (never all zeros)."""
    x = torch.randn(*shape, generator=gen) * (torch.rand(*shape[:-1], 1, generator=gen) * 8 + 0.01)
    x.view(-1)[:: max(1, x.numel() // 5)] *= 50
    return x.to(dtype)


def fp8_weight(
    gen: torch.Generator, n: int, k: int, scale_fmt: str = "float"
) -> tuple[torch.Tensor, torch.Tensor]:
    return quant.fp8_block_quant(rand(gen, n, k), scale_fmt=scale_fmt)


def int4_weight(
    gen: torch.Generator, n: int, k: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values in [-8, 7], int32 words packed by independent int64 math, bf16 scales)."""
    q = torch.randint(-8, 8, (n, k), generator=gen)
    words = ((q + 8).view(n, k // 8, 8) << (4 * torch.arange(8))).sum(-1)
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    scale = (torch.rand(n, k // group, generator=gen) * 0.1 + 1e-3).to(torch.bfloat16)
    return q, packed, scale


def int4_f64(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return (q.double().view(n, scale.shape[1], -1) * scale.double().unsqueeze(-1)).view(n, k)


def fp8_gemm_f64(a, a_s, b, b_s) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 block-scaled product and the bound (K + 4) u sum|a_k b_k| for fp32 accumulation."""
    k = a.shape[1]
    a64 = a.double() * a_s.double().repeat_interleave(128, 1)[:, :k]
    b64 = b.double() * quant.expand_scale(b_s, tuple(b.shape)).double()
    return a64 @ b64.T, (k + 4) * 2.0**-24 * (a64.abs() @ b64.abs().T) + 1e-30


def check(cond: bool, seed: int, what: str) -> None:
    if not cond:
        raise AssertionError(f"{what} (seed {seed}; rerun with KERNEL_TEST_SEED={seed})")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == FP8:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


# ---------------------------------------------------------------- in process: twins vs float64 math


def test_act_quant_twin_matches_formula() -> None:
    seed = new_seed()
    gen = torch.Generator().manual_seed(seed)
    x = rand(gen, 3, 5, 200)
    y, s = ref.act_quant(x)
    check(y.shape == x.shape and y.dtype == FP8 and s.shape == (3, 5, 2), seed, "act_quant shapes")
    groups = [x[..., :128], x[..., 128:]]
    for g, (part, sg) in enumerate(zip(groups, s.unbind(-1), strict=True)):
        want = (part.double().abs().amax(-1).clamp_min(1e-4) / 448).float()
        check(torch.equal(sg, want), seed, f"act_quant scale of group {g}")
    err = (y.double() * s.double().repeat_interleave(128, -1)[..., :200] - x.double()).abs()
    check(
        bool((err <= x.double().abs() * 2.0**-4 + 2.0**-10 * s.double().amax()).all()),
        seed,
        "act_quant rounding",
    )
    _, s8 = ref.act_quant(x, scale_fmt="ue8m0")
    check(
        bool((torch.frexp(s8)[0] == 0.5).all() and (s8 >= s).all() and (s8 < 2 * s).all()),
        seed,
        "ue8m0 scales",
    )


def test_fp8_gemm_twin_matches_float64() -> None:
    seed = new_seed()
    gen = torch.Generator().manual_seed(seed)
    q, s = fp8_weight(gen, 576, 200)
    a, a_s = ref.act_quant(rand(gen, 5, 200))
    want, bound = fp8_gemm_f64(a, a_s, q, s)
    got = ref.fp8_gemm(a, a_s, q, s, torch.float32)
    check(bool(((got.double() - want).abs() <= bound).all()), seed, "fp8_gemm twin vs float64")
    check(torch.equal(ref.weight_dequant(q, s), quant.fp8_block_dequant(q, s)), seed, "weight_dequant twin")


def test_int4_twins_match_independent_math() -> None:
    seed = new_seed()
    gen = torch.Generator().manual_seed(seed)
    q, packed, scale = int4_weight(gen, 40, 256, 64)
    check(torch.equal(quant.int4_pack(q), packed), seed, "independent packing equals quant.int4_pack")
    w64 = int4_f64(q, scale)
    check(
        torch.equal(ref.int4_weight_dequant(packed, scale, (40, 256), torch.float32).double(), w64),
        seed,
        "int4 dequant",
    )
    x = rand(gen, 3, 256)
    got = ref.int4_gemm(x, packed, scale, 64, torch.float32).double()
    bound = 260 * 2.0**-24 * (x.double().abs() @ w64.abs().T)
    check(bool(((got - x.double() @ w64.T).abs() <= bound).all()), seed, "int4_gemm twin vs float64")


# ---------------------------------------------------------------- in process: launcher checks


class _Boom:
    """Stands in for a Triton kernel: any launch is a test failure."""

    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched although the arguments were bad")


def _bad_fp8_calls():
    gen = torch.Generator().manual_seed(new_seed())
    q, s = fp8_weight(gen, 576, 256)
    a, a_s = ref.act_quant(rand(gen, 4, 256))
    x = rand(gen, 4, 256, dtype=torch.bfloat16)
    return [
        ("act_quant", (x.to(torch.int32),), "dtype"),
        ("act_quant", (x.T,), "contiguous"),
        ("weight_dequant", (q.float(), s), "dtype"),
        ("weight_dequant", (q, s[:4]), "(5, 2)"),
        ("weight_dequant", (q.T.contiguous().T, s), "contiguous"),
        ("fp8_gemm", (a, a_s, q, s[:, :1].contiguous()), "needs (5, 2)"),
        ("fp8_gemm", (a, a_s[:, :1].contiguous(), q, s), "a_s has shape"),
        ("fp8_gemm", (a[:, :128].contiguous(), a_s[:, :1].contiguous(), q, s), "K mismatch"),
        ("fp8_gemm", (a.T, a_s, q, s), "contiguous"),
        ("fp8_gemm", (a.float(), a_s, q, s), "dtype"),
        ("fp8_gemm", (a, a_s.double(), q, s), "dtype"),
    ]


def _bad_int4_calls():
    gen = torch.Generator().manual_seed(new_seed())
    _, packed, scale = int4_weight(gen, 64, 256, 128)
    x = rand(gen, 2, 256, dtype=torch.bfloat16)
    return [
        ("int4_weight_dequant", (packed, scale, (64, 128)), "weight_shape"),
        ("int4_weight_dequant", (packed.to(torch.int64), scale, (64, 256)), "dtype"),
        ("int4_weight_dequant", (packed, scale[:32], (64, 256)), "scale has shape"),
        ("int4_gemm", (x, packed, scale, 64), "group_size 64"),
        ("int4_gemm", (x[:, :128].contiguous(), packed, scale, 128), "K mismatch"),
        ("int4_gemm", (x.T.contiguous().T, packed, scale, 128), "contiguous"),
        ("int4_gemm", (x.to(torch.int32), packed, scale, 128), "dtype"),
    ]


@pytest.mark.parametrize("group", ["fp8", "int4"])
def test_bad_launches_fail_clearly_before_any_kernel(group: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    mod = importlib.import_module(f"dsv3tools.kernels.{group}")
    for name in [n for n in vars(mod) if n.endswith("_kernel")]:
        monkeypatch.setattr(mod, name, _Boom())
    calls = _bad_fp8_calls() if group == "fp8" else _bad_int4_calls()
    for fn_name, args, needle in calls:
        for impl in (mod, ref):
            with pytest.raises(DSV3Error) as info:
                getattr(impl, fn_name)(*args)
            assert isinstance(info.value, ValueError)
            assert needle in str(info.value), (impl.__name__, fn_name, needle, str(info.value))


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dispatch.resolve_backend("auto", "cpu") == "torch"
    assert dispatch.resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(DSV3Error, match="TRITON_INTERPRET=1"):
        dispatch.resolve_backend("triton", "cpu")
    with pytest.raises(DSV3Error, match="unknown kernel backend"):
        dispatch.resolve_backend("cuda", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve_backend("auto", "cpu") == "torch"  # auto never picks the slow interpreter
    if dispatch.triton_available():
        assert dispatch.resolve_backend("triton", "cpu") == "triton"
    with pytest.raises(launch.KernelLaunchError, match="Triton kernels cannot run on cpu"):
        launch.check_triton_device(torch.device("cpu"), interpreted=False)


@pytest.mark.parametrize("fp8", [False, True])
def test_decode_tiles_fill_the_multiprocessors(fp8: bool) -> None:
    for n in (576, 2048, 7168, 24576):
        for m in (1, 4, 16):
            t = launch.gemm_tiles(m, n, False, sms=132, fp8=fp8)
            if fp8 and m == 1:  # measured faster with the wide tile on an H200
                assert t == launch.gemm_tiles(m, n, False), (m, n)
                continue
            assert t["BLOCK_N"] == 16 or -(-n // t["BLOCK_N"]) >= 132, (m, n, t)
            assert t["BLOCK_N"] == 64 or -(-n // (2 * t["BLOCK_N"])) < 132, (
                m,
                n,
                t,
            )  # no narrower than needed
    assert launch.gemm_tiles(64, 2048, False, sms=132) == launch.gemm_tiles(
        64, 2048, False
    )  # prefill: as before
    assert launch.gemm_tiles(1, 7168, True, sms=132)["BLOCK_N"] == 32  # the interpreter's fixed tiles


def test_gemv_split_k_slices_whole_groups_and_fills_the_multiprocessors() -> None:
    from dsv3tools.kernels import int4

    cdiv = quant.cdiv
    for n, k, group, sms in [
        (24576, 1536, 128, 132),
        (7168, 16384, 128, 132),
        (2048, 7168, 128, 132),
        (7168, 2048, 256, 132),
        (576, 7168, 32, 78),
        (100, 512, 64, 1),
        (50000, 1024, 128, 132),
    ]:
        t = int4.gemv_tiles(3, n, k, group, False, sms)
        case = (n, k, group, sms, t)
        split, slice_k, groups = t["SPLIT_K"], t["STEPS"] * t["BLOCK_K"], k // group
        assert group % t["BLOCK_K"] == 0 and slice_k % group == 0, case  # one scale per step, whole groups
        assert (split - 1) * slice_k < k <= split * slice_k, case  # every slice holds columns
        by_sms = cdiv(int4.GEMV_PROGRAMS_PER_SM * sms, cdiv(n, t["BLOCK_N"]))
        want = min(groups, max(by_sms, cdiv(k, int4.GEMV_MAX_SLICE)))
        assert 2 * split > want and split <= want, case  # balanced slices: at least half the wanted count
        assert slice_k == cdiv(groups, want) * group, case
        assert t["BLOCK_M"] == 4 and t["BLOCK_N"] * t["BLOCK_K"] == int4.GEMV_TILE, case
    assert int4.gemv_tiles(1, 40, 128, 128, True, 132)["BLOCK_N"] == 32  # the interpreter's tile
    with pytest.raises(launch.KernelLaunchError, match="no GEMV tiling"):
        int4.gemv_tiles(1, 64, 256, 8, False, 132)


def test_int4_gemv_refuses_what_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv3tools.kernels import int4

    for name in [n for n in vars(int4) if n.endswith("_kernel")]:
        monkeypatch.setattr(int4, name, _Boom())
    gen = torch.Generator().manual_seed(new_seed())
    _, packed, scale = int4_weight(gen, 64, 256, 128)
    _, packed8, scale8 = int4_weight(gen, 64, 256, 8)
    x = rand(gen, int4.GEMV_ROWS_LIMIT + 1, 256, dtype=torch.bfloat16)
    for args, needle in [
        ((x, packed, scale), f"at most {int4.GEMV_ROWS_LIMIT} rows"),
        ((x[:2], packed8, scale8, 8), "multiple of 16, got 8"),
        ((x[:2, :128].contiguous(), packed, scale), "K mismatch"),
        ((x[:2], packed, scale, 64), "group_size 64"),
        ((x[:2], packed, scale, 128, torch.int8), "out_dtype"),
    ]:
        with pytest.raises(launch.KernelLaunchError, match=needle):
            int4.int4_gemv(*args)


def test_torch_backend_linears_flatten_batch_dims() -> None:
    seed = new_seed()
    gen = torch.Generator().manual_seed(seed)
    q, s = fp8_weight(gen, 576, 256)
    x = rand(gen, 2, 3, 256, dtype=torch.bfloat16)
    y = dispatch.fp8_linear(x, q, s, "torch")
    xq, xs = ref.act_quant(x.reshape(6, 256))
    check(y.shape == (2, 3, 576) and y.dtype == torch.bfloat16, seed, "fp8_linear shape/dtype")
    check(
        torch.equal(y.reshape(6, 576), ref.fp8_gemm(xq, xs, q, s)), seed, "fp8_linear = act_quant + fp8_gemm"
    )
    yd = dispatch.fp8_linear_dequant(x.float(), q, s)
    check(
        torch.allclose(yd, x.float() @ quant.fp8_block_dequant(q, s, dtype=torch.float32).T),
        seed,
        "dequant path",
    )
    _, packed, scale = int4_weight(gen, 64, 256, 128)
    yi = dispatch.int4_linear(x, packed, scale, torch.tensor([64, 256]), 128, "torch")
    check(yi.shape == (2, 3, 64), seed, "int4_linear shape")
    with pytest.raises(DSV3Error, match="in_features=256"):
        dispatch.fp8_linear(x[..., :128], q, s, "torch")


# ---------------------------------------------------------------- subprocess: kernels under the interpreter


def kernel_group_fp8(seed: int) -> None:
    from dsv3tools.kernels import fp8

    gen = torch.Generator().manual_seed(seed)
    for shape, dtype, fmt in [
        ((1, 256), torch.bfloat16, None),
        ((3, 5, 200), torch.float32, "ue8m0"),
        ((7, 72), torch.float16, None),
    ]:
        x = rand(gen, *shape, dtype=dtype)
        for got, want in zip(fp8.act_quant(x, 128, fmt), ref.act_quant(x, 128, fmt), strict=True):
            check(same_bits(got, want), seed, f"act_quant {shape} {dtype} {fmt}")
    for n, k in [(576, 256), (130, 200)]:  # kv_a_proj_with_mqa's ragged rows; ragged rows and K
        q, s = fp8_weight(gen, n, k, "ue8m0" if n == 130 else "float")
        for dt in (torch.bfloat16, torch.float32):
            check(
                same_bits(fp8.weight_dequant(q, s, dt), ref.weight_dequant(q, s, dt)),
                seed,
                f"weight_dequant {n}x{k} {dt}",
            )
        for m in (1, 7, 33):
            a, a_s = ref.act_quant(rand(gen, m, k))
            got = fp8.fp8_gemm(a, a_s, q, s, torch.float32).double()
            want, bound = fp8_gemm_f64(a, a_s, q, s)
            check(bool(((got - want).abs() <= bound).all()), seed, f"fp8_gemm M={m} {n}x{k} vs float64")
            twin = ref.fp8_gemm(a, a_s, q, s, torch.float32).double()
            check(bool(((got - twin).abs() <= 2 * bound).all()), seed, f"fp8_gemm M={m} {n}x{k} vs twin")
            g16, t16 = fp8.fp8_gemm(a, a_s, q, s).float(), ref.fp8_gemm(a, a_s, q, s).float()
            check(
                bool(((g16 - t16).abs() <= t16.abs() * 2.0**-7 + 2 * bound).all()),
                seed,
                f"fp8_gemm bf16 M={m}",
            )


def kernel_group_int4(seed: int) -> None:
    from dsv3tools.kernels import int4

    gen = torch.Generator().manual_seed(seed)
    for n, k, group in [(576, 256, 128), (130, 160, 32), (40, 200, 8)]:  # group 8: the fallback path
        q, packed, scale = int4_weight(gen, n, k, group)
        w64 = int4_f64(q, scale)
        for dt in (torch.bfloat16, torch.float32):
            got = int4.int4_weight_dequant(packed, scale, (n, k), dt)
            check(
                same_bits(got, ref.int4_weight_dequant(packed, scale, (n, k), dt)),
                seed,
                f"int4 dequant {n}x{k} {dt}",
            )
        check(torch.equal(got.double(), w64), seed, f"int4 dequant {n}x{k} vs float64")
        x = rand(gen, 3, k, dtype=torch.bfloat16)
        check(int4.int4_gemm(x, packed, scale, group).dtype == torch.bfloat16, seed, "int4_gemm output dtype")
        x = rand(gen, int4.DEQUANT_MATMUL_MIN_M, k, dtype=torch.bfloat16)  # prefill: dequant + matmul
        got = int4.int4_gemm(x, packed, scale, group).double()
        want = ref.int4_gemm(x, packed, scale, group).double()  # bf16 out: bf16 roundings apart
        bound = 2.0**-7 * (x.double().abs() @ w64.abs().T)
        check(bool(((got - want).abs() <= bound).all()), seed, f"int4_gemm M=128 {n}x{k}")
        for m in (1, 33):
            for dt in (torch.bfloat16, torch.float32):
                x = rand(gen, m, k, dtype=dt)
                got = int4.int4_gemm(x, packed, scale, group, torch.float32).double()
                want = x.double() @ w64.T
                bound = (k + 4) * 2.0**-24 * (x.double().abs() @ w64.abs().T) + 1e-30
                check(
                    bool(((got - want).abs() <= bound).all()),
                    seed,
                    f"int4_gemm M={m} {n}x{k} {dt} vs float64",
                )
                twin = ref.int4_gemm(x, packed, scale, group, torch.float32).double()
                check(
                    bool(((got - twin).abs() <= 2 * bound).all()),
                    seed,
                    f"int4_gemm M={m} {n}x{k} {dt} vs twin",
                )


def kernel_group_gemv(seed: int) -> None:
    """The split-K GEMV at decode M: vs float64 and the twin, split and single-slice, bit-stable."""
    from dsv3tools.kernels import int4

    gen = torch.Generator().manual_seed(seed)
    int4.int4_gemm_kernel = _Boom()  # up to GEMV_MAX_M rows int4_gemm must not reach the tl.dot kernel
    bf16, fp32 = torch.bfloat16, torch.float32
    for n, k, group, runs in [  # (M, activation dtype) per weight; N ragged for BLOCK_N, K in several slices
        (40, 512, 128, [(1, bf16), (3, fp32), (int4.GEMV_MAX_M, bf16)]),
        (56, 192, 32, [(1, fp32), (3, bf16), (int4.GEMV_MAX_M, fp32)]),
    ]:
        q, packed, scale = int4_weight(gen, n, k, group)
        w64 = int4_f64(q, scale)
        for m, dt in runs:
            t = int4.gemv_tiles(m, n, k, group, True)
            check(t["SPLIT_K"] > 1 and n % t["BLOCK_N"] > 0, seed, f"GEMV test shape {n}x{k} tiles {t}")
            x = rand(gen, m, k, dtype=dt)
            got = int4.int4_gemm(x, packed, scale, group, fp32)
            _check_int4_product(got, x, w64, packed, scale, group, seed, f"GEMV M={m} {n}x{k} g{group} {dt}")
            if m == int4.GEMV_MAX_M:
                again = int4.int4_gemm(x, packed, scale, group, fp32)
                check(torch.equal(got, again), seed, f"GEMV M={m} {n}x{k} not deterministic")
            if m == 3:  # output in the activation dtype: the twin's fp32 result rounded once
                got16, t16 = int4.int4_gemm(x, packed, scale, group), ref.int4_gemm(x, packed, scale, group)
                bound = 2 * (k + 4) * 2.0**-24 * (x.double().abs() @ w64.abs().T)
                ok = got16.dtype == dt and bool(
                    ((got16.double() - t16.double()).abs() <= t16.double().abs() * 2.0**-7 + bound).all()
                )
                check(ok, seed, f"GEMV M={m} {n}x{k} {dt} out")
    q, packed, scale = int4_weight(gen, 40, 128, 128)  # one group: a single slice, stored without the reduce
    int4.splitk_reduce_kernel = _Boom()
    m = int4.GEMV_ROWS_LIMIT
    check(int4.gemv_tiles(m, 40, 128, 128, True)["SPLIT_K"] == 1, seed, "single-slice GEMV shape")
    x = rand(gen, m, 128, dtype=torch.bfloat16)
    got = int4.int4_gemv(x, packed, scale, 128, fp32)
    _check_int4_product(got, x, int4_f64(q, scale), packed, scale, 128, seed, f"int4_gemv M={m} one slice")


def _check_int4_product(got, x, w64, packed, scale, group, seed: int, what: str) -> None:
    """fp32 result within fp32 summation-order error of float64 math, and of the float32 twin."""
    got, k = got.double(), x.shape[1]
    bound = (k + 4) * 2.0**-24 * (x.double().abs() @ w64.abs().T) + 1e-30
    check(bool(((got - x.double() @ w64.T).abs() <= bound).all()), seed, f"{what} vs float64")
    twin = ref.int4_gemm(x, packed, scale, group, torch.float32).double()
    check(bool(((got - twin).abs() <= 2 * bound).all()), seed, f"{what} vs twin")


def kernel_group_dispatch(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q, s = fp8_weight(gen, 576, 256)
    x = rand(gen, 2, 3, 256, dtype=torch.bfloat16)
    assert dispatch.resolve_backend("triton", "cpu") == "triton"
    for fmt in (None, "ue8m0"):
        a = dispatch.fp8_linear(x, q, s, "triton", fmt, torch.float32)
        b = dispatch.fp8_linear(x, q, s, "torch", fmt, torch.float32)
        _, bound = fp8_gemm_f64(*ref.act_quant(x.reshape(6, 256), 128, fmt), q, s)
        ok = a.shape == (2, 3, 576) and bool(((a - b).reshape(6, 576).abs() <= 2 * bound).all())
        check(ok, seed, f"fp8_linear backends {fmt}")
    a, b = dispatch.fp8_linear_dequant(x, q, s, "triton"), dispatch.fp8_linear_dequant(x, q, s, "torch")
    check(torch.equal(a, b), seed, "fp8_linear_dequant backends")
    q4, packed, scale = int4_weight(gen, 64, 256, 128)
    a = dispatch.int4_linear(x, packed, scale, (64, 256), 128, "triton", torch.float32)
    b = dispatch.int4_linear(x, packed, scale, (64, 256), 128, "torch", torch.float32)
    bound = 2 * 260 * 2.0**-24 * (x.double().abs() @ int4_f64(q4, scale).abs().T)
    check(a.shape == (2, 3, 64) and bool(((a - b).abs() <= bound).all()), seed, "int4_linear backends")


GROUPS = {
    "fp8": kernel_group_fp8,
    "int4": kernel_group_int4,
    "gemv": kernel_group_gemv,
    "dispatch": kernel_group_dispatch,
}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)


@pytest.mark.parametrize("group", list(GROUPS))
def test_kernels_equal_twins_under_interpreter(group: str) -> None:
    proc = _run([sys.executable, str(Path(__file__).resolve()), group])
    assert proc.returncode == 0, f"kernel group {group} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"


def test_gpu_benchmark_script_smoke() -> None:
    script = str(ROOT / "benchmarks" / "gpu_kernels.py")
    proc = _run([sys.executable, script, "--interpret-smoke", "--json"])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert '"failures": []' in proc.stdout
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run kernel groups with TRITON_INTERPRET=1"
    run_seed = new_seed()
    print(f"kernel group {sys.argv[1]}: seed {run_seed}")
    GROUPS[sys.argv[1]](run_seed)
