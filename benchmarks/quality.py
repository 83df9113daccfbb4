"""The quality table of every conversion target on the trained tiny model (issue 19, Must-show 4), regenerated
end to end through the CLI: one row per target, each measured on the converted checkpoint itself.

The reference is the trained tiny model (:mod:`dsv3tools.evals.train_tiny`, FP8 as trained) converted to bf16;
every target is converted from that bf16 reference (``convert --to fp8|int4|nvfp4|mxfp4|fp16``), so each row
shows what one conversion costs. Per row:

- ``compare --against REF --against-dtype float32``: KL(target || reference) mean and max, top-1 agreement, on
  held-out corpus lines (the reference always computes in float32; the row's compute dtype is the target's);
- ``eval --task tinyfacts``: accuracy on the 60 shipped questions (4 choices, chance 0.25);
- ``mtp-bench --k 1``: the MTP acceptance alpha of the converted checkpoint's own MTP layer (a conversion that
  damages the MTP layer shows as a drop) and whether speculative decoding stayed lossless.

Compute is float32 for the format rows (the numbers are the weights' error alone); the ``bf16`` and ``fp16``
compute rows run the reference / fp16 checkpoint in that dtype (``--dtype``), the fp16 one through the
float16 forward's rescaled residual stream.

GGUF rows (``convert --to gguf ... --gguf-mtp``) are measured on the ``.gguf`` file itself (``load_model``
dequantizes it through ``gguf.quants``; its MTP layer ``blk.N.nextn`` drafts in ``mtp-bench``): bf16, q8_0,
q4_0 and the "dynamic" recipe (routed experts q4_0, every other matrix q8_0, router and norms F32 as always).
The trained tiny's byte-level tokenizer is not one llama.cpp knows: the exporter writes ``tokenizer.ggml.pre``
"default" and warns. A second table compares every float32-compute row with the FP8 original itself:
``compare --model FP8 --against TARGET`` (KL(FP8 || target)).

Run: ``flock /work/bench.lock python benchmarks/quality.py [--work DIR] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ENV = {"OMP_NUM_THREADS": "1", "DSV3TOOLS_NO_PROGRESS": "1", "TQDM_DISABLE": "1"}
PROMPT_LINES = 48  # held-out corpus lines for compare (a seed the training data did not use)
PROMPT_SEED_OFFSET = 300
# the stacked routed-expert tensors' GGUF names (the shared expert's are ffn_*_shexp)
GGUF_EXPERTS = "ffn_(gate|up|down)_exps"


@dataclass(frozen=True)
class Row:
    label: str
    convert: tuple[str, ...] | None  # convert arguments from the bf16 reference; None: the reference itself
    dtype: str = "float32"  # compute dtype of compare / eval / mtp-bench for this row
    folder: str = ""  # converted folder name under the work dir (rows sharing a checkpoint share it)


ROWS = [
    Row("bf16 (reference)", None),
    Row("bf16, bf16 compute", None, "bfloat16"),
    Row("fp8 (128x128 blocks)", ("--to", "fp8"), folder="fp8"),
    Row("int4 rtn, experts", ("--to", "int4", "--int4-method", "rtn"), folder="int4-rtn-experts"),
    Row("int4 mse, experts", ("--to", "int4", "--int4-method", "mse"), folder="int4-mse-experts"),
    Row(
        "int4 rtn, all",
        ("--to", "int4", "--int4-method", "rtn", "--int4-scope", "all"),
        folder="int4-rtn-all",
    ),
    Row(
        "int4 mse, all",
        ("--to", "int4", "--int4-method", "mse", "--int4-scope", "all"),
        folder="int4-mse-all",
    ),
    Row("nvfp4, experts", ("--to", "nvfp4"), folder="nvfp4-experts"),
    Row("nvfp4, all", ("--to", "nvfp4", "--int4-scope", "all"), folder="nvfp4-all"),
    Row("mxfp4, experts", ("--to", "mxfp4"), folder="mxfp4-experts"),
    Row("mxfp4, all", ("--to", "mxfp4", "--int4-scope", "all"), folder="mxfp4-all"),
    Row("fp16", ("--to", "fp16"), folder="fp16"),
    Row("fp16, float16 compute", ("--to", "fp16"), "float16", folder="fp16"),
    Row("gguf bf16", ("--to", "gguf", "--gguf-type", "bf16", "--gguf-mtp"), folder="gguf-bf16"),
    Row("gguf q8_0", ("--to", "gguf", "--gguf-type", "q8_0", "--gguf-mtp"), folder="gguf-q8_0"),
    Row("gguf q4_0", ("--to", "gguf", "--gguf-type", "q4_0", "--gguf-mtp"), folder="gguf-q4_0"),
    Row(
        "gguf dynamic (experts q4_0, rest q8_0)",
        ("--to", "gguf", "--gguf-type", "q8_0", "--gguf-tensor-type", f"{GGUF_EXPERTS}=q4_0", "--gguf-mtp"),
        folder="gguf-dynamic",
    ),
]


def cli(*args: str | Path) -> dict:
    """``python -m dsv3tools ARGS --json`` in a subprocess; its JSON object (raises on a non-zero exit)."""
    cmd = [sys.executable, "-m", "dsv3tools", *map(str, args), "--json"]
    # run outside the repository: its top-level kernels/ folder would shadow the PyPI package of that name
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **ENV), cwd=Path.home())
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout)


def write_prompts(path: Path) -> Path:
    from dsv3tools.evals import corpus
    from dsv3tools.evals.train_tiny import TrainConfig

    cfg = TrainConfig()
    lines = corpus.sample_lines(cfg.corpus, PROMPT_LINES, seed=cfg.corpus.seed + PROMPT_SEED_OFFSET)
    path.write_text("".join(json.dumps({"prompt": line}) + "\n" for line in lines))
    return path


def checkpoint_bytes(model: Path) -> int:
    """Bytes of the weights: the safetensors shards of a folder, or the ``.gguf`` file."""
    if model.is_file():
        return model.stat().st_size
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def converted(row: Row, ref: Path, work: Path) -> tuple[Path, dict]:
    """The row's checkpoint (converted from ``ref`` once per folder; a GGUF row's is its ``.gguf`` file) and
    the tensor types per GGUF type (empty for the other formats)."""
    folder, saved = work / row.folder, work / f"{row.folder}.convert.json"
    if not folder.exists():
        saved.write_text(json.dumps(cli("convert", "--model", ref, *row.convert, "--out", folder)))
    if "gguf" not in row.convert:
        return folder, {}
    report = json.loads(saved.read_text())
    return Path(report["files"][0]), {k: v["tensors"] for k, v in report["by_type"].items()}


def measure(row: Row, model: Path, ref: Path, prompts: Path) -> dict:
    """compare against the reference, tinyfacts accuracy and MTP alpha (k=1) of one checkpoint."""
    dtypes = ("--dtype", row.dtype, "--against-dtype", "float32")
    c = cli("compare", "--model", model, "--against", ref, "--prompts", prompts, *dtypes)
    e = cli("eval", "--model", model, "--task", "tinyfacts", "--dtype", row.dtype)
    m = cli("mtp-bench", "--model", model, "--k", "1", "--dtype", row.dtype)
    return {
        "label": row.label,
        "convert": list(row.convert or ()),
        "dtype": row.dtype,
        "bytes": checkpoint_bytes(model),
        "kl_mean": c["kl_mean"],
        "kl_max": c["kl_max"],
        "top1_agreement": c["top1_agreement"],
        "positions": c["positions"],
        "tinyfacts_acc": e["metrics"]["tinyfacts"]["acc"],
        "tinyfacts_n": e["n_samples"]["tinyfacts"],
        "alpha_k1": m["alpha"],
        "lossless": m["lossless"],
    }


def table(rows: list[dict]) -> str:
    head = "| target | compute | size (MB) | KL mean | KL max | top-1 | tinyfacts acc | MTP alpha (k=1) | lossless |"
    out = [head, "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(
            f"| {r['label']} | {r['dtype']} | {r['bytes'] / 1e6:.2f} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} "
            f"| {r['top1_agreement']:.3f} | {r['tinyfacts_acc']:.3f} | {r['alpha_k1']:.3f} | {r['lossless']} |"
        )
    return "\n".join(out)


def against_fp8(rows: list[dict], models: list[Path], fp8: Path, prompts: Path) -> list[dict]:
    """``compare --model FP8 --against TARGET`` (both in float32) for every float32-compute row."""
    out = []
    for r, model in zip(rows, models, strict=True):
        if r["dtype"] != "float32":
            continue
        dtypes = ("--dtype", "float32", "--against-dtype", "float32")
        c = cli("compare", "--model", fp8, "--against", model, "--prompts", prompts, *dtypes)
        out.append({"label": r["label"], **{k: c[k] for k in ("kl_mean", "kl_max", "top1_agreement")}})
    return out


def fp8_table(rows: list[dict]) -> str:
    out = ["| target | KL mean, FP8 to target | KL max | top-1 vs FP8 |", "|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['label']} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} | {r['top1_agreement']:.3f} |")
    return "\n".join(out)


def measure_all(trained: Path, work: Path, t0: float) -> tuple[list[dict], list[dict]]:
    """Every row of :data:`ROWS` against the bf16 reference, then the float32 rows against the FP8 original."""
    ref = work / "bf16"
    cli("convert", "--model", trained, "--to", "bf16", "--out", ref)
    prompts = write_prompts(work / "prompts.jsonl")
    rows, models = [], []
    for row in ROWS:
        model, types = (ref, {}) if row.convert is None else converted(row, ref, work)
        rows.append(dict(measure(row, model, ref, prompts), gguf_types=types))
        models.append(model)
        print(f"{row.label}: done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return rows, against_fp8(rows, models, trained, prompts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dsv3tools-quality"), help="converted checkpoints")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the converted checkpoints")
    args = ap.parse_args(argv)

    from dsv3tools.evals.train_tiny import trained_tiny

    t0 = time.time()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    trained = trained_tiny(cache=True)
    rows, vs_fp8 = measure_all(trained, work, t0)
    print(f"trained tiny model: {trained} (reference: its bf16 conversion); {rows[0]['positions']} positions")
    print(table(rows))
    for r in rows:
        if r["gguf_types"]:
            print(f"{r['label']}: GGUF tensors by type {r['gguf_types']}")
    print(f"\nagainst the FP8 original ({trained}), compare --model FP8 --against TARGET, float32:")
    print(fp8_table(vs_fp8))
    if args.json is not None:
        args.json.write_text(json.dumps({"trained": str(trained), "rows": rows, "vs_fp8": vs_fp8}, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
