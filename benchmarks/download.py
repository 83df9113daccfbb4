"""Download throughput benchmark: ``dsv3tools.hub.download`` (plan + disk check + parallel fetch + sha256
verification of every file) against plain ``huggingface_hub.snapshot_download`` on the same local
hub server (``dsv3tools.hub.server``, run in its own process) in the same run. Target: ratio >= 0.9.

Run by hand:  python benchmarks/download.py [--files 32] [--mb 32] [--workers 8] [--repeats 3] [--json]

Each repeat runs both (order alternating) into fresh folders and fresh hub caches; the ratio is
the median over repeats of ours/baseline throughput, each pair run back to back.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

REPO = "deepseek-ai/DeepSeek-V3"


def make_repo(root: Path, files: int, mb: int) -> int:
    """Random LFS-style shards plus a config: ``files`` x ``mb`` MiB."""
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(files):
        data = os.urandom(1 << 20) * mb  # cheap to make, still a real sha256 per file
        name = f"model-{i + 1:05d}-of-{files:06d}.safetensors"
        (root / name).write_bytes(data[: len(data) - i])  # distinct sizes/hashes
        total += len(data) - i
    (root / "config.json").write_text(json.dumps({"num_hidden_layers": 61, "num_nextn_predict_layers": 1}))
    return total + (root / "config.json").stat().st_size


def _serve(root: str, q: mp.Queue) -> None:
    from dsv3tools.hub.server import HubServer

    server = HubServer({REPO: Path(root)}).start()
    q.put(server.endpoint)
    time.sleep(10**6)


def run_ours(endpoint: str, out: Path, cache: Path, workers: int) -> float:
    from dsv3tools.hub import download as dl

    t = time.perf_counter()
    res = dl.download(REPO, local_dir=out, endpoint=endpoint, cache_dir=cache, max_workers=workers)
    dt = time.perf_counter() - t
    assert not res.failed, res.failed
    return dt


def run_baseline(endpoint: str, out: Path, cache: Path, workers: int) -> float:
    from huggingface_hub import snapshot_download

    t = time.perf_counter()
    snapshot_download(REPO, local_dir=out, endpoint=endpoint, cache_dir=cache, max_workers=workers)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=32)
    ap.add_argument("--mb", type=int, default=32)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    work = Path(tempfile.mkdtemp(prefix="dsv3-dl-bench-"))
    try:
        total = make_repo(work / "repo", args.files, args.mb)
        q: mp.Queue = mp.get_context("spawn").Queue()
        server = mp.get_context("spawn").Process(target=_serve, args=(str(work / "repo"), q), daemon=True)
        server.start()
        endpoint = q.get(timeout=120)
        times: dict[str, list[float]] = {"ours": [], "baseline": []}
        for i in range(args.repeats):
            order = ("baseline", "ours") if i % 2 == 0 else ("ours", "baseline")
            for who in order:
                out, cache = work / f"{who}-{i}", work / f"cache-{who}-{i}"
                fn = run_ours if who == "ours" else run_baseline
                times[who].append(fn(endpoint, out, cache, args.workers))
                shutil.rmtree(out)
                shutil.rmtree(cache, ignore_errors=True)
        server.terminate()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(total, times, args)


def report(total: int, times: dict[str, list[float]], args: argparse.Namespace) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    tput = {k: total / v / 1e6 for k, v in med.items()}
    # median of per-repeat ratios (each pair ran back to back), robust to load drift on a shared machine
    ratio = statistics.median(b / o for b, o in zip(times["baseline"], times["ours"], strict=True))
    result = {
        "bytes": total,
        "files": args.files + 1,
        "workers": args.workers,
        "repeats": args.repeats,
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "throughput_MBps": {k: round(v, 1) for k, v in tput.items()},
        "ratio": round(ratio, 3),
        "target": 0.9,
        "pass": ratio >= 0.9,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"payload: {args.files + 1} files, {total / 1e6:.1f} MB, {args.workers} workers, {args.repeats} repeats"
    )
    for k in ("baseline", "ours"):
        runs = ", ".join(f"{x:.2f}" for x in times[k])
        print(f"  {k:<9} median {med[k]:.3f} s  {tput[k]:8.1f} MB/s   (runs: {runs} s)")
    print(
        f"ratio ours/baseline (median of per-repeat ratios) = {ratio:.3f}  (target >= 0.9: {'PASS' if ratio >= 0.9 else 'FAIL'})"
    )


if __name__ == "__main__":
    main()
