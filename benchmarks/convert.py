"""Benchmark ``dsv3tools convert`` on real-shape checkpoints, every number measured in the same run:

- fp8 -> bf16 wall time over the time of ``cp -r`` of the produced folder (target <= 1.5);
- speed-up over a naive baseline written here (whole shard through ``safetensors.torch.load_file``,
  eager float32 dequant with the reference formulas, ``save_file``, then fsync of each written file as
  ``convert`` does; target >= 3x), for -> bf16 and -> int4;
- peak RSS of each run (target <= 1 GiB + 2x the largest input shard, not growing with the shard count),
  for two checkpoint sizes: A (2 layers, 16 experts: 10.1 GB in 8 shards) and C (2 layers, 64 experts:
  14.3 GB in 13 shards); -> int4 on A.

Every timing runs ``--repeat`` times (median reported, all values kept), each in its own subprocess, with
a cold page cache for what it reads: the source files' pages are dropped first (fdatasync, then
``POSIX_FADV_DONTNEED`` per file, nothing else on the machine is touched); ``cp -r`` likewise reads the
produced folder cold and is timed until its files are fsynced (``sync FILE...``). Peak RSS: ``%M`` of
``/usr/bin/time`` (the largest single process) and the sum over the process tree polled every 50 ms
(what matters with ``--workers`` > 1).

Each row with ``cp -r`` also prints ``naive_over_cp``: the speed-up over naive of a converter exactly as
fast as ``cp -r``: about the ceiling that this machine's storage puts on the ratio in that run (a converter
reads the smaller fp8 input where ``cp`` reads the bf16 output, so it can be a little faster than ``cp``).
``--workdir /dev/shm/cvb --checkpoints D --no-cp`` puts input and output in RAM: D (every linear at its
real shape, a vocabulary of 8192) is small enough for both to fit, so the disk is out of the comparison.

``--out-root /dev/shm --checkpoints A --no-cp`` writes the outputs to RAM instead (a stand-in for a disk
faster than this machine's, and a different file system from the input's).

``--peer llmcompressor`` instead times ours against llm-compressor's ``model_free_ptq`` (FP8_BLOCK and NVFP4A16
from a bf16 real-shape input, see ``convert_peer.py``).

Usage: ``python benchmarks/convert.py --workdir /tmp/cvbench`` (synthesizes what is missing; real-shape
checkpoints of several GB; the outputs are deleted as soon as they are measured).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def naive(model: Path, out: Path, to: str) -> None:
    """The baseline: whole shards in memory, eager float32 dequant, reference quantizers, save_file."""
    import torch
    from safetensors.torch import load_file, save_file

    from dsv3tools.quant.reference import fp8_block_dequant, int4_pack, int4_quant

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
        with open(out / shard, "rb+") as f:  # durable like convert's output (it fsyncs every shard)
            os.fsync(f.fileno())
        weight_map.update(dict.fromkeys(dst, shard))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def drop_cache(folder: Path) -> None:
    """Make the next read of ``folder`` cold: write back and drop the page cache of its files only."""
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def timed(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (GiB: largest process from ``/usr/bin/time -f %M``, and the polled
    sum over the process tree) of a child command."""
    t = time.perf_counter()
    p = subprocess.Popen(
        ["/usr/bin/time", "-f", "%M", *cmd],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, DSV3TOOLS_NO_PROGRESS="1"),
    )
    proc, peak = psutil.Process(p.pid), 0
    while p.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.05)
    wall = time.perf_counter() - t
    err = p.stderr.read() if p.stderr else ""
    if p.returncode:
        raise RuntimeError(f"{cmd}: exit {p.returncode}: {err[-2000:]}")
    return {"s": wall, "rss": int(err.strip().splitlines()[-1]) / 2**20, "rss_tree": peak / 2**30}


def ensure(path: Path, layers: int, experts: int, vocab: int | None, shard_bytes: int) -> Path:
    if not (path / "config.json").is_file():
        from dsv3tools.checkpoint.synth import synthesize

        over = {"vocab_size": vocab} if vocab else None
        synthesize(
            path,
            preset="real-shape",
            layers=layers,
            experts=experts,
            max_shard_bytes=shard_bytes,
            overrides=over,
        )
    return path


def shard_stats(path: Path) -> tuple[int, int, int]:
    files = list(path.glob("model-*.safetensors"))
    return len(files), sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)


def run_ours(model: Path, out: Path, to: str, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    drop_cache(model)
    cmd = ["-m", "dsv3tools", "convert", "--model", str(model), "--to", to, "--out", str(out)]
    return timed([sys.executable, *cmd, "--workers", str(workers), "--json"])


def run_naive(model: Path, out: Path, to: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    drop_cache(model)
    r = timed([sys.executable, __file__, "--naive", str(model), str(out), to])
    shutil.rmtree(out, ignore_errors=True)
    return r


def run_cp(src: Path, dst: Path) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    drop_cache(src)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync", *[str(f) for f in dst.rglob("*") if f.is_file()]], check=True)
    wall = time.perf_counter() - t
    shutil.rmtree(dst, ignore_errors=True)
    return {"s": wall}


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def bench_ours(model: Path, out: Path, to: str, workers: int, repeat: int, cp_dst: Path | None) -> dict:
    """``repeat`` runs of ours (and, when ``cp_dst`` is given, of ``cp -r`` of the produced folder)."""
    ours, cps = [], []
    for _ in range(repeat):
        ours.append(run_ours(model, out, to, workers))
        if cp_dst is not None:
            cps.append(run_cp(out, cp_dst))
        shutil.rmtree(out, ignore_errors=True)
    row = {
        "ours_s": median_of(ours, "s"),
        "ours_runs_s": [round(r["s"], 1) for r in ours],
        "rss_gib": max(r["rss"] for r in ours),
        "rss_tree_gib": max(r["rss_tree"] for r in ours),
    }
    if cps:
        row.update(cp_s=median_of(cps, "s"), cp_runs_s=[round(r["s"], 1) for r in cps])
        row["ratio_vs_cp"] = row["ours_s"] / row["cp_s"]
    return row


def bench_naive(model: Path, out: Path, to: str, repeat: int) -> dict:
    runs = [run_naive(model, out, to) for _ in range(repeat)]
    return {
        "naive_s": median_of(runs, "s"),
        "naive_runs_s": [round(r["s"], 1) for r in runs],
        "rss_naive_gib": max(r["rss"] for r in runs),
    }


def emit(row: dict) -> None:
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cvbench"))
    ap.add_argument("--out-root", type=Path, default=None, help="where outputs go (default: --workdir)")
    ap.add_argument("--checkpoints", default="A,C", help="comma-separated: A, C, D")
    ap.add_argument("--no-cp", action="store_true", help="skip cp -r of the output")
    ap.add_argument("--naive", nargs=3, metavar=("MODEL", "OUT", "TO"))
    ap.add_argument("--workers", default="1,2", help="comma-separated --workers values")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--targets", default="bf16,int4", help="comma-separated: bf16, int4")
    ap.add_argument(
        "--peer", choices=["llmcompressor"], help="only ours against model_free_ptq (convert_peer.py)"
    )
    ap.add_argument(
        "--peer-python",
        default="/work/venvs/llmc/bin/python",
        help="llmcompressor 0.14 venv (python -m venv /work/venvs/llmc; pip install torch==2.13.0 llmcompressor==0.14.*)",
    )
    ap.add_argument("--peer-experts", type=int, default=8, help="routed experts of the --peer bf16 input")
    a = ap.parse_args()
    if a.naive:
        naive(Path(a.naive[0]), Path(a.naive[1]), a.naive[2])
        return
    if a.peer:
        from convert_peer import bench_peer

        print(f"load average: {os.getloadavg()}", flush=True)
        bench_peer(a.workdir, a.peer_python, a.peer_experts, int(a.workers.split(",")[0]))
        return
    models = {
        name: ensure(a.workdir / CHECKPOINTS[name][0], *CHECKPOINTS[name][1:], 10**9)
        for name in a.checkpoints.split(",")
    }
    print(f"load average: {os.getloadavg()}", flush=True)
    workers = [int(x) for x in a.workers.split(",")]
    if "bf16" in a.targets:
        for name, model in models.items():
            bench_target(a.out_root or a.workdir, name, model, "bf16", workers, a.repeat, not a.no_cp)
    if "int4" in a.targets and "A" in models:
        bench_target(a.out_root or a.workdir, "A", models["A"], "int4", workers, a.repeat, False)


# name -> (folder, layers, experts, vocab_size or None for the real one). A and C have the real 1.85 GB
# embedding (and head, and their MTP copies) as largest shard; C has 4x the routed experts, so fp8 linears
# are 47 % of its bytes instead of 26 %. D keeps every linear at its real shape but a vocabulary of 8192
# (embedding and head 117 MB): 4.5 GB in 5 shards, 85 % fp8, small enough for input and output to fit in RAM
# together (``--workdir /dev/shm/...``), which takes the disk out of the comparison.
CHECKPOINTS = {"A": ("rs2", 2, 16, None), "C": ("rs64", 2, 64, None), "D": ("rs32v8k", 2, 32, 8192)}


def bench_target(
    workdir: Path, name: str, model: Path, to: str, workers: list[int], repeat: int, with_cp: bool
) -> None:
    """fp8 -> ``to`` on one checkpoint, outputs under ``workdir``: the naive baseline, ours per ``--workers``
    value and, ``with_cp``, ``cp -r`` of the produced folder."""
    n, total, largest = shard_stats(model)
    base = {"checkpoint": name, "shards": n, "gb": total / 1e9, "largest_shard_gb": largest / 1e9}
    base["rss_target_gib"] = 1 + 2 * largest / 2**30
    naive_row = bench_naive(model, workdir / f"{name}-naive", to, repeat)
    for w in workers:
        cp_dst = workdir / f"{name}-cp" if with_cp else None
        row = dict(base, to=to if to == "bf16" else "int4 (experts, rtn)", workers=w)
        row.update(bench_ours(model, workdir / f"{name}-{to}", to, w, repeat, cp_dst))
        row.update(naive_row, speedup_vs_naive=naive_row["naive_s"] / row["ours_s"])
        if "cp_s" in row:  # what a converter exactly as fast as cp -r would score: the disk's ceiling
            row["naive_over_cp"] = naive_row["naive_s"] / row["cp_s"]
        emit(row)


if __name__ == "__main__":
    main()
