"""DeepSeek-V3.2's sparse attention (DSA) against dense MLA on one real-shape attention layer on CPU: prefill
time and peak memory at T = 1k, 4k, 8k tokens (index_topk from the config, 2048 at full scale), printed as
ratios in one run. Each (mode, T) runs in a fresh child process so its peak RSS is its own; the layer's
weights are random bf16 at the release's shapes (``synth --preset full --family v3.2``'s config).

    python benchmarks/dsa.py [--tokens 1024 4096 8192] [--threads N]

Memory: the indexer scores queries in chunks (``SCORE_CHUNK_ELEMS``) and the absorbed sparse path gathers
top-k latent rows chunk by chunk, so the peak above the weights must not grow as T^2 x heads; dense MLA's
naive path materialises per-head scores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(mode: str, t: int, threads: int) -> dict:
    import torch

    from dsv3tools.checkpoint.synth import preset_config
    from dsv3tools.config import ModelConfig
    from dsv3tools.model.attention import MLA
    from dsv3tools.model.linear import Linear
    from dsv3tools.model.rope import cos_sin, inv_freq

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(preset_config("full", family="v3.2", dtype="bf16"))
    mla = MLA(cfg, attn_impl="auto")
    if mode == "dense":
        mla.indexer = None
    for m in mla.modules():
        if isinstance(m, Linear):
            m.weight = torch.randn(m.out_features, m.in_features, dtype=torch.bfloat16) * m.in_features**-0.5
        elif hasattr(m, "dim") and "weight" in m._buffers:  # RMSNorm / the indexer's LayerNorm
            m.weight = torch.ones(m.dim)
            if "bias" in m._buffers:
                m.bias = torch.zeros(m.dim)
    pos = torch.arange(t)[None]
    rope = cos_sin(inv_freq(cfg), pos)
    allowed = (torch.arange(t)[None, :] <= torch.arange(t)[:, None])[None, None]
    x = torch.randn(1, t, cfg.hidden_size, dtype=torch.bfloat16)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        t0 = time.perf_counter()
        y = mla(x, rope, allowed)
        sec = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    topk = cfg.raw.get("index_topk")
    return {
        "mode": mode,
        "T": t,
        "seconds": sec,
        "peak_above_inputs_mib": (peak - base) / 1024,
        "topk": topk,
        "finite": bool(torch.isfinite(y).all()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.threads)))
        return 0
    rows = {}
    for t in args.tokens:
        for mode in ("dense", "dsa"):
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", mode, str(t)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            rows[mode, t] = (
                json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": last}
            )
    topk = next((r["topk"] for r in rows.values() if "topk" in r), "?")
    print(f"one real-shape V3.2 attention layer, bf16, CPU, {args.threads} threads, index_topk {topk}")
    print(
        f"{'T':>6} {'dense s':>9} {'DSA s':>8} {'DSA/dense':>10} {'dense MiB':>10} {'DSA MiB':>8} {'DSA/dense':>10}"
    )
    for t in args.tokens:
        d, s = rows["dense", t], rows["dsa", t]
        if "error" in d or "error" in s:
            print(f"{t:>6} dense: {d.get('error', 'ok')[:110]} | DSA: {s.get('error', 'ok')[:110]}")
            if "error" not in s:
                print(
                    f"{'':>6} DSA alone: {s['seconds']:.2f} s, {s['peak_above_inputs_mib']:.0f} MiB above inputs"
                )
            continue
        assert d["finite"] and s["finite"]
        print(
            f"{t:>6} {d['seconds']:>9.2f} {s['seconds']:>8.2f} {s['seconds'] / d['seconds']:>9.2f}x "
            f"{d['peak_above_inputs_mib']:>10.0f} {s['peak_above_inputs_mib']:>8.0f} "
            f"{s['peak_above_inputs_mib'] / max(d['peak_above_inputs_mib'], 1):>9.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
