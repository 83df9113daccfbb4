"""Tune the int4 split-K GEMV (``kernels/int4.py``) on a GPU: its tiling knobs, checked and timed. Run by hand.

For DeepSeek-V3's real Linear shapes at decode sizes (M = 1, 4, 8) it times, with CUDA-graph replays
(``do_bench_cudagraph``, median), bf16 ``torch.matmul``, the tl.dot W4A16 kernel (``GEMV_MAX_M = 0``)
and the GEMV for every combination of ``GEMV_TILE`` (BLOCK_N x BLOCK_K), ``GEMV_PROGRAMS_PER_SM`` and
``GEMV_MAX_SLICE`` (the two limits that set how far K is split); each GEMV result is first compared with the PyTorch twin (max |diff| / max |twin|, fp32 out).
Prints one row per case with GB/s of int4 weight read and the speed-up over bf16 and over tl.dot.

    python benchmarks/gpu_gemv_sweep.py [--m 1,4,8] [--tiles 8192] [--per-sm 2,4,8] [--max-slice 2048]
    python benchmarks/gpu_gemv_sweep.py --interpret-smoke   # CPU, TRITON_INTERPRET=1, tiny shapes

Exit codes: 0 every GEMV matched its twin; 1 one did not; 2 no CUDA device (without ``--interpret-smoke``).
"""

from __future__ import annotations

import argparse
import os
import sys

from gpu_kernels import SHAPES, int4_settings, make_weights, rel_err, timer

SMOKE_SHAPES = {"small": (100, 512)}
TOL = 1e-3


def gpu_ms(bench, fn) -> float:
    """Milliseconds per call: the CUDA-graph replay time, or the eager time where capture failed (NaN)."""
    eager, graph = bench(fn)
    return eager if graph != graph else graph


def sweep_shape(wts: dict, m: int, args: argparse.Namespace, bench, gen) -> tuple[list[dict], list[str]]:
    """Rows (bf16, tl.dot, each GEMV variant) and failure lines for one shape and M."""
    import torch

    from dsv3tools.kernels import int4
    from dsv3tools.kernels import reference as ref

    n, k = wts["q"].shape
    x = (torch.randn(m, k, generator=gen, device=wts["q"].device) * 2).to(torch.bfloat16)
    want = ref.int4_gemm(x, wts["packed"], wts["scale"], wts["group"], torch.float32)
    call = lambda: int4.int4_gemm(x, wts["packed"], wts["scale"], wts["group"])  # noqa: E731
    w_bytes = n * k // 2 + 2 * wts["scale"].numel()
    rows, bad = [], []
    base = gpu_ms(bench, lambda: torch.matmul(x, wts["w_bf16"].T))
    with int4_settings(GEMV_MAX_M=0):
        dot = gpu_ms(bench, call)
    rows.append({"N": n, "K": k, "M": m, "case": "bf16 torch.matmul", "ms": base, "bytes": 2 * n * k})
    rows.append({"N": n, "K": k, "M": m, "case": "int4 tl.dot kernel", "ms": dot, "bytes": w_bytes})
    variants = [
        (int(t), int(p), int(s))
        for t in args.tiles.split(",")
        for p in args.per_sm.split(",")
        for s in args.max_slice.split(",")
    ]
    for tile, per_sm, max_slice in variants:
        with int4_settings(
            GEMV_TILE=tile, GEMV_PROGRAMS_PER_SM=per_sm, GEMV_MAX_SLICE=max_slice, GEMV_MAX_M=max(m, 1)
        ):
            err = rel_err(int4.int4_gemm(x, wts["packed"], wts["scale"], wts["group"], torch.float32), want)
            tiles = int4.gemv_tiles(m, n, k, wts["group"], int4.INTERPRETED, int4.launch.sm_count(x.device))
            ms = gpu_ms(bench, call)
        name = f"gemv {tile} x{per_sm}/SM <={max_slice} (BN {tiles['BLOCK_N']}, split {tiles['SPLIT_K']})"
        if not err <= TOL:
            bad.append(f"{n}x{k} M={m} {name}: rel err {err:.2e} > {TOL}")
        rows.append({"N": n, "K": k, "M": m, "case": name, "ms": ms, "bytes": w_bytes, "err": err})
    for r in rows:
        r["gbps"] = r["bytes"] / (r["ms"] * 1e-3) / 1e9
        r["vs_bf16"], r["vs_dot"] = base / r["ms"], dot / r["ms"]
    return rows, bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", default="1,4,8")
    p.add_argument("--tiles", default="8192", help="GEMV_TILE values (BLOCK_N * BLOCK_K)")
    p.add_argument("--per-sm", default="2,4,8", help="GEMV_PROGRAMS_PER_SM values")
    p.add_argument("--max-slice", default="2048", help="GEMV_MAX_SLICE values (K columns)")
    p.add_argument("--interpret-smoke", action="store_true")
    args = p.parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    device = "cpu" if args.interpret_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_gemv_sweep.py needs a CUDA GPU; use --interpret-smoke on CPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(4), "little"))
    bench = timer(device)
    rows, bad = [], []
    for n, k in (SMOKE_SHAPES if args.interpret_smoke else SHAPES).values():
        wts = make_weights(n, k, device, gen)
        for m in [int(v) for v in args.m.split(",")]:
            got, fail = sweep_shape(wts, m, args, bench, gen)
            rows, bad = rows + got, bad + fail
    print(f"{'shape':>14} {'M':>3} {'case':<44} {'ms (GPU)':>9} {'GB/s':>7} {'vs bf16':>8} {'vs dot':>7}")
    for r in rows:
        print(
            f"{r['N']:>6}x{r['K']:<7} {r['M']:>3} {r['case']:<44} {r['ms']:>9.4f} {r['gbps']:>7.0f} "
            f"{r['vs_bf16']:>7.2f}x {r['vs_dot']:>6.2f}x"
        )
    print("checks: every GEMV matches the twin" if not bad else "CHECK FAILURES:\n  " + "\n  ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
