"""GPU check and benchmark of the dsv3tools Triton kernels on DeepSeek-V3's real Linear shapes. Run by hand.

For every shape (q_b_proj, o_proj, expert gate/up, expert down) and M in 1, 16, 128, 4096 it first checks
each kernel against its PyTorch twin (act_quant, weight_dequant, fp8_gemm, int4_weight_dequant, int4_gemm),
then times it against ``torch.matmul`` in bf16 on the same shape and prints time, TFLOP/s, GB/s, the
speedup over bf16 and the fraction of the card's bf16 matmul rate, measured in the same run on an
8192^3 bf16 matmul. Rates use the GPU time (calls replayed from a CUDA graph); the eager column is the
time per call launched from Python, launch overhead included. Where the decode tile heuristic narrows
BLOCK_N to fill the SMs, the GEMMs are also timed with the wide tile (rows "BLOCK_N=64"). int4_gemm's
other routes are checked and timed beside its default: "int4_gemm tl.dot" (the tl.dot kernel where the
split-K GEMV is the default, M <= int4.GEMV_MAX_M), "int4_gemv" (the GEMV where the tl.dot kernel is, M up
to int4.GEMV_ROWS_LIMIT) and "int4_gemm fused" (the tl.dot kernel where dequant + matmul is, M >=
int4.DEQUANT_MATMUL_MIN_M).

    python benchmarks/gpu_kernels.py [--m 1,16,128,4096] [--shapes q_b_proj,o_proj] [--json]
    python benchmarks/gpu_kernels.py --interpret-smoke   # CPU, TRITON_INTERPRET=1, tiny shapes

Exit codes: 0 all checks passed; 1 a kernel disagreed with its twin; 2 no CUDA device (without
``--interpret-smoke``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator

SHAPES = {  # name: (N = out_features, K = in_features)
    "q_b_proj": (24576, 1536),
    "o_proj": (7168, 16384),
    "expert_gate_up": (2048, 7168),
    "expert_down": (7168, 2048),
}
SMOKE_SHAPES = {"kv_a_ragged": (576, 256), "ragged_k": (130, 200)}
FP8_GEMM_TOL = 5e-3  # max |kernel - twin| / max |twin|; Hopper fp8 MMA accumulates 128-wide steps coarsely
INT4_GEMM_TOL = 1e-3
INT4_BF16_TOL = 8e-3  # bf16 out; at M >= 128 the weight is rounded to bf16 too (q * s, as Marlin does)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", default="1,16,128,4096", help="comma-separated token counts M")
    p.add_argument(
        "--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ", ".join(SHAPES)
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--interpret-smoke", action="store_true", help="run the check path on tiny CPU shapes")
    return p.parse_args(argv)


def timer(device: str) -> Callable[[Callable[[], object]], tuple[float, float]]:
    """(eager, graph) milliseconds per call. CUDA: the median of ``triton.testing.do_bench`` (each call
    launched from Python, as an eager caller sees it: launch overhead included when it exceeds the GPU time)
    and of ``do_bench_cudagraph`` (the calls replayed from a CUDA graph: GPU time alone). CPU: one call."""
    if device == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        def cuda(fn: Callable[[], object]) -> tuple[float, float]:
            eager = float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            try:
                graph = float(do_bench_cudagraph(fn, rep=50, return_mode="median"))
            except Exception as e:  # a launcher that cannot be captured: report, do not stop the table
                print(f"  (no CUDA-graph timing: {type(e).__name__}: {e})", file=sys.stderr)
                graph = float("nan")
            return eager, graph

        return cuda

    def cpu(fn: Callable[[], object]) -> tuple[float, float]:  # the smoke run: no compile step, no warmup
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return ms, ms

    return cpu


@contextlib.contextmanager
def wide_decode_tiles() -> Iterator[None]:
    """Launch as if the GPU had one SM: decode GEMMs keep BLOCK_N = 64 (the tile before narrowing)."""
    from dsv3tools.kernels import launch

    real = launch.sm_count
    launch.sm_count = lambda device: 1
    try:
        yield
    finally:
        launch.sm_count = real


def rel_err(got, want) -> float:
    """max |got - want| / max |want| in float64."""
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def make_weights(n: int, k: int, device: str, gen) -> dict:
    """Random FP8 block-quantized and int4 pack-quantized weights of shape [n, k] (no quantizer needed)."""
    import torch

    from dsv3tools.quant.reference import cdiv

    w = torch.randn(n, k, generator=gen, device=device, dtype=torch.float32) * 0.02
    q = (torch.randn(n, k, generator=gen, device=device) * 96).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(cdiv(n, 128), cdiv(k, 128), generator=gen, device=device) * 1e-3 + 1e-4
    lo, hi = -(2**31), 2**31 - 1  # every int32 bit pattern is 8 valid nibbles
    packed = torch.randint(lo, hi, (n, k // 8), generator=gen, device=device, dtype=torch.int64).to(
        torch.int32
    )
    group = 128 if k % 128 == 0 else 8  # 8: the dequant + matmul fallback, for the ragged-K smoke shape
    scale = (torch.rand(n, k // group, generator=gen, device=device) * 2e-3 + 1e-4).to(torch.bfloat16)
    return {"w_bf16": w.to(torch.bfloat16), "q": q, "s": s, "packed": packed, "scale": scale, "group": group}


def check_shape(wts: dict, m: int, gen) -> tuple[list[str], dict[str, float]]:
    """Every kernel vs its twin at one shape and M; returns failure lines (empty = all good) and the GEMMs'
    relative errors."""
    import torch

    from dsv3tools.kernels import fp8, int4
    from dsv3tools.kernels import reference as ref

    n, k = wts["q"].shape
    dev = wts["q"].device
    x = (torch.randn(m, k, generator=gen, device=dev) * torch.rand(m, 1, generator=gen, device=dev) * 4).to(
        torch.bfloat16
    )
    bad = []
    y, ys = fp8.act_quant(x)
    ry, rys = ref.act_quant(x)
    if not torch.equal(ys, rys) or not torch.equal(y.view(torch.uint8), ry.view(torch.uint8)):
        bad.append(f"act_quant [{m},{k}] differs from the twin")
    if m == 1:  # weight-only kernels: once per shape
        if not torch.equal(fp8.weight_dequant(wts["q"], wts["s"]), ref.weight_dequant(wts["q"], wts["s"])):
            bad.append(f"weight_dequant [{n},{k}] differs from the twin")
        shape = (n, k)
        got = int4.int4_weight_dequant(wts["packed"], wts["scale"], shape)
        if not torch.equal(got, ref.int4_weight_dequant(wts["packed"], wts["scale"], shape)):
            bad.append(f"int4_weight_dequant [{n},{k}] differs from the twin")
    err = rel_err(  # the same quantized inputs for both: the GEMM alone is compared
        fp8.fp8_gemm(ry, rys, wts["q"], wts["s"], torch.float32),
        ref.fp8_gemm(ry, rys, wts["q"], wts["s"], torch.float32),
    )
    errs = {"fp8_gemm": err}
    if not err <= FP8_GEMM_TOL:
        bad.append(f"fp8_gemm M={m} [{n},{k}] rel err {err:.2e} > {FP8_GEMM_TOL}")
    want = ref.int4_gemm(x, wts["packed"], wts["scale"], wts["group"], torch.float32)
    case = ("int4_gemm", lambda: int4.int4_gemm(x, wts["packed"], wts["scale"], wts["group"], torch.float32))
    for name, fn, *_ in [case, *_int4_other_routes((*case, 0, 0), wts, x, torch.float32)]:  # fp32 out
        got = fn()
        errs[name] = err = rel_err(got, want)
        if not err <= INT4_GEMM_TOL:
            bad.append(f"{name} M={m} [{n},{k}] rel err {err:.2e} > {INT4_GEMM_TOL}")
        if fn is case[1] and m <= int4.GEMV_MAX_M and not torch.equal(got, fn()):  # split-K, no atomics
            bad.append(f"{name} M={m} [{n},{k}] differs between two calls")
    got = int4.int4_gemm(
        x, wts["packed"], wts["scale"], wts["group"]
    )  # bf16 out (dequant + matmul at M >= 128)
    err = rel_err(got, ref.int4_gemm(x, wts["packed"], wts["scale"], wts["group"]))
    errs["int4_gemm bf16 out"] = err
    if not err <= INT4_BF16_TOL:
        bad.append(f"int4_gemm bf16 out M={m} [{n},{k}] rel err {err:.2e} > {INT4_BF16_TOL}")
    return bad, errs


def bf16_peak(device: str, bench) -> float:
    """The card's bf16 matmul rate in TFLOP/s, measured now (8192^3 on CUDA, 512^3 on CPU)."""
    import torch

    size = 8192 if device == "cuda" else 512
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    return 2 * size**3 / (bench(lambda: torch.matmul(a, b))[0] * 1e-3) / 1e12


def time_shape(wts: dict, m: int, bench, peak: float, gen) -> list[dict]:
    """Time bf16 matmul and each kernel at one shape and M; one row per kernel."""
    n, k = wts["q"].shape
    rows, base_ms = [], None
    for name, fn, nbytes, fl in _shape_cases(wts, m, gen):
        eager_ms, ms = bench(fn)
        ms = eager_ms if ms != ms else ms  # NaN: no graph timing
        base_ms = ms if base_ms is None else base_ms
        tflops = fl / (ms * 1e-3) / 1e12
        rows.append(
            {
                "kernel": name, "N": n, "K": k, "M": m, "ms": ms, "eager_ms": eager_ms, "tflops": tflops,
                "gbps": nbytes / (ms * 1e-3) / 1e9, "frac_bf16_peak": tflops / peak if peak else 0.0,
                "speedup_vs_bf16": base_ms / ms if fl else None,
            }
        )  # fmt: skip
    return rows


def _shape_cases(wts: dict, m: int, gen) -> list[tuple[str, Callable[[], object], int, int]]:
    """(name, call, bytes moved, flops) for bf16 matmul first, then each kernel at one shape and M."""
    import torch

    from dsv3tools.kernels import dispatch, fp8, int4, launch

    n, k = wts["q"].shape
    dev = wts["q"].device
    x = torch.randn(m, k, generator=gen, device=dev).to(torch.bfloat16)
    xq, xs = fp8.act_quant(x)
    flops = 2 * m * n * k
    io = 2 * m * k + 2 * m * n  # bf16 activations in, bf16 out
    fp8_w = n * k + 4 * wts["s"].numel()
    int4_w = n * k // 2 + 2 * wts["scale"].numel()
    cases = [
        ("bf16 torch.matmul", lambda: torch.matmul(x, wts["w_bf16"].T), 2 * n * k + io, flops),
        (
            "fp8_gemm",
            lambda: fp8.fp8_gemm(xq, xs, wts["q"], wts["s"]),
            fp8_w + m * k + 4 * xs.numel() + 2 * m * n,
            flops,
        ),
        (
            "fp8_linear (act_quant+gemm)",
            lambda: dispatch.fp8_linear(x, wts["q"], wts["s"], "triton"),
            fp8_w + io,
            flops,
        ),
        (
            "int4_gemm",
            lambda: int4.int4_gemm(x, wts["packed"], wts["scale"], wts["group"]),
            int4_w + io,
            flops,
        ),
    ]
    cases += _int4_other_routes(cases[3], wts, x)
    dot = cases[3] if m > int4.GEMV_MAX_M else _int4_dot_case(cases[3])  # the tl.dot kernel's tiles
    for is_fp8, (name, fn, nbytes, fl) in zip((True, False), (cases[1], dot), strict=True):
        tiles = launch.gemm_tiles(m, n, False, sms=launch.sm_count(dev), fp8=is_fp8)
        if tiles != launch.gemm_tiles(m, n, False):  # narrowed: also time the wide decode tile
            cases.append((name + " BLOCK_N=64", lambda fn=fn: _wide(fn), nbytes, fl))
    if m == 1:
        cases.append(("weight_dequant", lambda: fp8.weight_dequant(wts["q"], wts["s"]), fp8_w + 2 * n * k, 0))
        shape = (n, k)
        cases.append(
            (
                "int4_weight_dequant",
                lambda: int4.int4_weight_dequant(wts["packed"], wts["scale"], shape),
                int4_w + 2 * n * k,
                0,
            )
        )
    return cases


def _int4_dot_case(case: tuple) -> tuple:
    name, fn, nbytes, fl = case
    return (name + " tl.dot", lambda: _tl_dot(fn), nbytes, fl)


def _int4_other_routes(
    case: tuple, wts: dict, x, out_dtype=None
) -> list[tuple[str, Callable[[], object], int, int]]:
    """``int4_gemm``'s routes other than its default at x's M (``case`` times the default), for checks and
    timings beside it: the fused tl.dot kernel beside dequant + matmul (prefill) and beside the GEMV
    (decode), the GEMV beside the tl.dot kernel for M up to ``GEMV_ROWS_LIMIT``. Only where the group size
    lets int4_gemm fuse (a multiple of 16)."""
    from dsv3tools.kernels import int4

    name, fn, nbytes, fl = case
    m = x.shape[0]
    if wts["group"] % 16:
        return []
    if m >= int4.DEQUANT_MATMUL_MIN_M:
        return [(name + " fused", lambda: _fused(fn), nbytes, fl)]
    if m <= int4.GEMV_MAX_M:
        return [_int4_dot_case(case)]
    if m <= int4.GEMV_ROWS_LIMIT:
        return [
            (
                "int4_gemv",
                lambda: int4.int4_gemv(x, wts["packed"], wts["scale"], wts["group"], out_dtype),
                nbytes,
                fl,
            )
        ]
    return []


@contextlib.contextmanager
def int4_settings(**values: int) -> Iterator[None]:
    """Set module constants of ``dsv3tools.kernels.int4`` (routes, GEMV tiling) for the duration."""
    from dsv3tools.kernels import int4

    old = {k: getattr(int4, k) for k in values}
    for k, v in values.items():
        setattr(int4, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(int4, k, v)


def _tl_dot(fn: Callable[[], object]) -> object:
    """``fn`` with int4_gemm's GEMV route switched off (the tl.dot kernel at decode M)."""
    with int4_settings(GEMV_MAX_M=0):
        return fn()


def _fused(fn: Callable[[], object]) -> object:
    """``fn`` with int4_gemm's dequant + matmul route switched off (the fused W4A16 kernel at any M)."""
    with int4_settings(DEQUANT_MATMUL_MIN_M=1 << 62):
        return fn()


def _wide(fn: Callable[[], object]) -> object:
    with wide_decode_tiles():
        return fn()


def print_rows(rows: list[dict]) -> None:
    head = (
        f"{'shape':>14} {'M':>5} {'kernel':<30} {'ms (GPU)':>9} {'eager ms':>9} {'TFLOP/s':>8} {'GB/s':>8} "
        f"{'of peak':>8} {'vs bf16':>8}"
    )
    print(head)
    for r in rows:
        sp = "" if r["speedup_vs_bf16"] is None else f"{r['speedup_vs_bf16']:.2f}x"
        print(
            f"{r['N']:>6}x{r['K']:<7} {r['M']:>5} {r['kernel']:<30} {r['ms']:>9.4f} {r['eager_ms']:>9.4f} "
            f"{r['tflops']:>8.1f} "
            f"{r['gbps']:>8.0f} {r['frac_bf16_peak']:>8.1%} {sp:>8}"
        )


def run(args: argparse.Namespace) -> int:
    import torch

    device = "cpu" if args.interpret_smoke else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 twins must really be fp32
    shapes = SMOKE_SHAPES if args.interpret_smoke else {s: SHAPES[s] for s in args.shapes.split(",")}
    ms = [1, 3] if args.interpret_smoke else [int(v) for v in args.m.split(",")]
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator(device=device).manual_seed(seed)
    bench = timer(device)
    peak = bf16_peak(device, bench)
    failures, rows, worst = [], [], {}
    for name, (n, k) in shapes.items():
        wts = make_weights(n, k, device, gen)
        for m in ms:
            bad, errs = check_shape(wts, m, gen)
            failures += [f"{name}: {line}" for line in bad]
            worst.update({key: max(worst.get(key, 0.0), v) for key, v in errs.items()})
            rows += time_shape(wts, m, bench, peak, gen)
        del wts
    if args.json:
        print(
            json.dumps(
                {
                    "device": device_name(device),
                    "bf16_peak_tflops": peak,
                    "seed": seed,
                    "rows": rows,
                    "failures": failures,
                    "max_rel_err_vs_twin": worst,
                }
            )
        )
    else:
        print(f"device: {device_name(device)}   measured bf16 matmul peak: {peak:.1f} TFLOP/s   seed: {seed}")
        print_rows(rows)
        print("max relative error vs the twin: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
        print(
            "checks: all kernels match their twins"
            if not failures
            else "CHECK FAILURES:\n  " + "\n  ".join(failures)
        )
    return 1 if failures else 0


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before dsv3tools.kernels / triton kernels are imported
    import torch

    if not args.interpret_smoke and not torch.cuda.is_available():
        print(
            "gpu_kernels.py needs a CUDA GPU (none found); run with --interpret-smoke to exercise the "
            "check path on CPU under TRITON_INTERPRET=1",
            file=sys.stderr,
        )
        return 2
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        print(
            f"unknown shape(s) {', '.join(sorted(unknown))}; choose from {', '.join(SHAPES)}", file=sys.stderr
        )
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
