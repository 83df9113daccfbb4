"""Benchmark ``dsv3tools convert`` on real-shape checkpoints, every number measured in the same run:

- fp8 -> bf16 wall time over the time of ``cp -r`` of the produced folder (target <= 1.5);
- speed-up over a naive baseline written here (whole shard through ``safetensors.torch.load_file``,
  eager float32 dequant with the reference formulas, ``save_file``; target >= 3x), for -> bf16 and -> int4;
- peak RSS of each run (target <= 1 GiB + 2x the largest input shard, not growing with the shard count),
  for two checkpoint sizes.

Usage: ``python benchmarks/convert.py --workdir /tmp/cvbench`` (synthesizes what is missing; real-shape
checkpoints of several GB; the outputs are deleted as soon as they are measured).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def naive(model: Path, out: Path, to: str) -> None:
    """The baseline: whole shards in memory, eager float32 dequant, reference quantizers, save_file."""
    import torch
    from safetensors.torch import load_file, save_file

    from dsv3tools.quant import fp8_block_dequant, int4_pack, int4_quant

    out.mkdir(parents=True)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        src = load_file(model / shard)
        dst = {}
        for name, t in src.items():
            if name.endswith("_scale_inv"):
                continue
            if t.dtype == torch.float8_e4m3fn:
                w = fp8_block_dequant(t, src[name + "_scale_inv"], (128, 128), torch.float32)
                prefix = name.removesuffix(".weight")
                if to == "int4" and ".mlp.experts." in name:
                    q, s = int4_quant(w, 128, "rtn")
                    dst[prefix + ".weight_packed"], dst[prefix + ".weight_scale"] = int4_pack(q), s
                    dst[prefix + ".weight_shape"] = torch.tensor(list(w.shape))
                else:
                    dst[name] = w.to(torch.bfloat16)
            else:
                dst[name] = t
        save_file(dst, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(dst, shard))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of a child command, from ``/usr/bin/time -f %M``."""
    t = time.perf_counter()
    r = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *cmd],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, DSV3TOOLS_NO_PROGRESS="1"),
    )
    wall = time.perf_counter() - t
    return wall, int(r.stderr.strip().splitlines()[-1]) / 2**20


def ensure(path: Path, layers: int, experts: int, shard_bytes: int) -> Path:
    if not (path / "config.json").is_file():
        from dsv3tools.synth import synthesize

        synthesize(path, preset="real-shape", layers=layers, experts=experts, max_shard_bytes=shard_bytes)
    return path


def shard_stats(path: Path) -> tuple[int, int, int]:
    files = list(path.glob("model-*.safetensors"))
    return len(files), sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)


def run_ours(model: Path, out: Path, to: str, workers: int) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    return timed(
        [
            sys.executable,
            "-m",
            "dsv3tools",
            "convert",
            "--model",
            str(model),
            "--to",
            to,
            "--out",
            str(out),
            "--workers",
            str(workers),
            "--json",
        ]
    )


def run_naive(model: Path, out: Path, to: str) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    r = timed([sys.executable, __file__, "--naive", str(model), str(out), to])
    shutil.rmtree(out, ignore_errors=True)
    return r


def run_cp(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - t
    shutil.rmtree(dst, ignore_errors=True)
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cvbench"))
    ap.add_argument("--naive", nargs=3, metavar=("MODEL", "OUT", "TO"))
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    if a.naive:
        naive(Path(a.naive[0]), Path(a.naive[1]), a.naive[2])
        return
    big = ensure(a.workdir / "rs2", 2, 16, 10**9)
    small = ensure(a.workdir / "rs1", 1, 8, 10**9)
    rows = []
    for name, model, full in (("A", big, True), ("B", small, False)):
        n, total, largest = shard_stats(model)
        out = a.workdir / f"{name}-bf16"
        t1, rss1 = run_ours(model, out, "bf16", a.workers)
        row = {
            "checkpoint": name,
            "shards": n,
            "gb": total / 1e9,
            "largest_shard_gb": largest / 1e9,
            "to": "bf16",
            "workers": a.workers,
            "ours_s": t1,
            "rss_gib": rss1,
            "rss_target_gib": 1 + 2 * largest / 2**30,
        }
        if full:
            tcp = run_cp(out, a.workdir / f"{name}-cp")
            tn, rssn = run_naive(model, a.workdir / f"{name}-naive", "bf16")
            row.update(
                cp_s=tcp, naive_s=tn, ratio_vs_cp=t1 / tcp, speedup_vs_naive=tn / t1, rss_naive_gib=rssn
            )
        shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    n, total, largest = shard_stats(small)
    out = a.workdir / "B-int4"
    t1, rss1 = run_ours(small, out, "int4", a.workers)
    shutil.rmtree(out, ignore_errors=True)
    tn, rssn = run_naive(small, a.workdir / "B-naive-int4", "int4")
    rows.append(
        {
            "checkpoint": "B",
            "shards": n,
            "gb": total / 1e9,
            "to": "int4 (experts, rtn)",
            "workers": a.workers,
            "ours_s": t1,
            "naive_s": tn,
            "speedup_vs_naive": tn / t1,
            "rss_gib": rss1,
            "rss_naive_gib": rssn,
            "rss_target_gib": 1 + 2 * largest / 2**30,
        }
    )
    print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
