"""The validation gate's cost on the full-size layout (SPEC sec. 14): a sparse synthetic DeepSeek-V3
(163 shards, every tensor header of the release, data regions left as holes) checked by
``validate_checkpoint`` against the safetensors library opening every shard's header (``safe_open`` +
``keys()``), the floor any reader pays, measured in the same run.

    python benchmarks/gate.py [--workdir DIR] [--repeat 3]

One row per fresh process (what one command pays, page cache warm after the synth): the safetensors
floor, the gate's first pass, and its second call in the same process (the cache: what every later open
of the folder pays).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys, time, json
from pathlib import Path
from safetensors import safe_open
folder = Path(sys.argv[1])
t0 = time.perf_counter()
n = 0
for shard in sorted(folder.glob("*.safetensors")):
    with safe_open(str(shard), framework="pt") as f:
        n += len(list(f.keys()))
t_peer = time.perf_counter() - t0
from dsv3tools.checkpoint.validate import validate_checkpoint
t0 = time.perf_counter()
gate = validate_checkpoint(folder)
t_gate = time.perf_counter() - t0
t0 = time.perf_counter()
validate_checkpoint(folder)
t_cached = time.perf_counter() - t0
print(json.dumps({"tensors": n, "problems": len(gate.problems), "peer_s": t_peer, "gate_s": t_gate,
                  "cached_s": t_cached}))
"""


def run_child(folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from dsv3tools.checkpoint.synth import synthesize

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp) / "full-sparse"
        t0 = time.perf_counter()
        summary = synthesize(folder, preset="full", sparse=True)
        print(f"synth full --sparse: {summary.get('shards')} shards in {time.perf_counter() - t0:.1f} s")
        runs = [run_child(folder) for _ in range(args.repeat)]
    best = min(runs, key=lambda r: r["gate_s"])
    print(f"tensors {best['tensors']:,}, gate problems {best['problems']}")
    print(f"{'run':>4} {'safetensors headers':>20} {'gate':>8} {'gate cached':>12} {'gate / peer':>12}")
    for i, r in enumerate(runs):
        print(
            f"{i:>4} {r['peer_s']:>19.3f}s {r['gate_s']:>7.3f}s {r['cached_s']:>11.5f}s {r['gate_s'] / r['peer_s']:>11.2f}x"
        )
    print(
        f"best: gate {best['gate_s']:.3f} s warm (target < 2 s), {best['gate_s'] / best['peer_s']:.2f}x safetensors"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
