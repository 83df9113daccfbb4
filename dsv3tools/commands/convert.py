"""``dsv3tools convert``: fp8 blocks / bf16 / int4 / nvfp4 / mxfp4 / fp16, any to any other, streaming shard by
shard; ``--to gguf`` writes llama.cpp's format (SPEC sec. 12)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from dsv3tools.commands.common import (
    default_out,
    emit,
    human_bytes,
    json_option,
    model_option,
    parse_part,
    progress_bar,
    show_progress,
)


def _render(con, r: dict) -> None:
    opts = " ".join(f"{k}={v}" for k, v in r["options"].items())
    head = "plan" if r.get("dry_run") else ("converted" if r.get("complete") else "partial")
    con.print(f"{head}: {r['model']} ({r['source_format']}) -> {r['out']} ({opts})")
    if r.get("dry_run"):
        for s in r["shards"]:
            con.print(f"  {s['file']}: {s['tensors']} tensors, {human_bytes(s['bytes'])}")
    con.print(
        f"{r['tensors']:,} tensors ({r['converted_linears']:,} linears re-encoded) in {r['num_shards']} shards: "
        f"{human_bytes(r['bytes_in'])} -> {human_bytes(r['bytes_out'])}"
    )
    if not r.get("dry_run"):
        con.print(
            f"written {len(r['written'])} shards, skipped {len(r['skipped'])} already done"
            + ("" if r["complete"] else "; run again without --part to finish the folder")
        )
    if r.get("report"):
        rep = r["report"]
        con.print(
            f"report: {rep['file']} ({rep['tensors']} tensors, mean relative error {rep['mean_rel_error']:.4g}; by format: "
            + ", ".join(f"{k} {v:.4g}" for k, v in rep["mean_rel_error_by_format"].items())
            + ")"
        )


def _render_gguf(con, r: dict) -> None:
    head = "plan" if r.get("dry_run") else "converted"
    mtp = ", MTP kept" if r["mtp"] else ""
    con.print(f"{head}: {r['model']} -> {r['out']} (gguf {r['gguf_type']}, arch {r['arch']}{mtp})")
    for typ, row in r["by_type"].items():
        con.print(f"  {typ}: {row['tensors']} tensors, {human_bytes(row['bytes'])}")
    for name, fb in r["fallbacks"].items():
        con.print(f"  fallback {name}: {fb}")
    con.print(f"{r['tensors']} tensors, {human_bytes(r['bytes'])} in {len(r['splits'])} file(s)")
    if r.get("dry_run"):
        for s in r["splits"]:
            con.print(f"  {s['file']}: {s['tensors']} tensors, {human_bytes(s['bytes'])}")
        return
    con.print(
        f"wrote {len(r['written'])} file(s), kept {len(r['skipped'])} already complete, "
        f"tokenizer.ggml.pre {r['tokenizer_pre']}, {r['seconds']:.1f} s"
    )
    for f in r["files"]:
        con.print(f"  {f}")
    for w in r["warnings"]:
        con.print(f"warning: {w}")


def _gguf(
    model: str, out: Path | None, gguf_args: dict, workers: int, report: Path | None, json: bool
) -> None:
    from dsv3tools.converters.gguf.export import export_gguf
    from dsv3tools.converters.gguf.plan import GGUFOptions
    from dsv3tools.errors import DSV3Error

    if gguf_args["part"]:
        raise DSV3Error("--part is not for --to gguf (one writer per file); use --gguf-split-max-size")
    opts = GGUFOptions.parse(
        gguf_args["type"] or "bf16",
        gguf_args["tensor_types"],
        mtp=gguf_args["mtp"],
        split_max_size=_split_size(gguf_args["split"]),
        workers=workers,
    )
    out = out or default_out(model, "gguf")
    if gguf_args["dry_run"]:
        emit(export_gguf(model, out, opts, dry_run=True), json, _render_gguf)
        return
    from dsv3tools.converters.gguf.export import plan_size

    with progress_bar(plan_size(model, opts), "convert -> gguf", show_progress(json)) as advance:
        r = export_gguf(model, out, opts, progress=advance, report=report)
    emit(r, json, _render_gguf)


def _split_size(text: str | None) -> int:
    """``--gguf-split-max-size`` as llama.cpp reads it: bytes, or a number with K, M or G (powers of 1000);
    absent: one file."""
    import re

    from dsv3tools.errors import DSV3Error

    if text is None:
        return 0
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)\s*", text, re.IGNORECASE)
    size = int(float(m.group(1)) * 1000 ** " KMG".index((m.group(2) or " ").upper())) if m else 0
    if size <= 0:
        raise DSV3Error(
            f"--gguf-split-max-size {text!r}: use a positive size in bytes, or with K, M or G (e.g. 50G)"
        )
    return size


def _check_gguf_only(to: str, gguf_args: dict) -> None:
    from dsv3tools.errors import DSV3Error

    used = [k for k in ("type", "tensor_types", "mtp", "split") if gguf_args[k] not in (None, [])]
    if to != "gguf" and used:
        flag = {
            "type": "--gguf-type",
            "tensor_types": "--gguf-tensor-type",
            "mtp": "--gguf-mtp",
            "split": "--gguf-split-max-size",
        }
        raise DSV3Error(f"{flag[used[0]]} is for --to gguf only (this is --to {to}); drop it")


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert_cmd(
        model: str = model_option(),
        to: str = typer.Option(..., "--to", help="bf16 | fp8 | int4 | nvfp4 | mxfp4 | fp16 | gguf"),
        out: Path = typer.Option(None, "--out", help="output folder (default: sibling <model>-<to>)"),
        group_size: int = typer.Option(128, "--group-size", help="int4 group size along the input dimension"),
        int4_scope: str = typer.Option(
            "experts", "--int4-scope", help="experts (routed experts only) | all (int4, nvfp4, mxfp4)"
        ),
        int4_method: str = typer.Option("rtn", "--int4-method", help="rtn | mse (per-group clipping search)"),
        scale_fmt: str = typer.Option("float", "--scale-fmt", help="fp8 block scales: float | ue8m0"),
        workers: int = typer.Option(
            min(4, os.cpu_count() or 1), "--workers", help="processes (one output shard each at a time)"
        ),
        part: str = typer.Option(None, "--part", help="K/N: write every N-th output shard starting at K"),
        report: Path = typer.Option(None, "--report", help="write per-tensor relative errors (JSON) here"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the plan, write nothing"),
        gguf_type: str = typer.Option(
            None, "--gguf-type", help="gguf: bf16 (default) | f16 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1"
        ),
        gguf_tensor_type: list[str] = typer.Option(
            None,
            "--gguf-tensor-type",
            help="gguf: REGEX=TYPE for the GGUF tensors REGEX matches (repeatable)",
        ),
        gguf_mtp: bool = typer.Option(
            None,
            "--gguf-mtp/--no-gguf-mtp",
            help="gguf: keep / drop the MTP layer (blk.N with nextn.*); default as llama.cpp: kept for V3.2 only",
        ),
        gguf_split_max_size: str = typer.Option(
            None, "--gguf-split-max-size", help="gguf: split size, e.g. 50G"
        ),
        json: bool = json_option(),
    ) -> None:
        """Convert between FP8 blocks, BF16, FP16, int4, NVFP4 and MXFP4 (compressed-tensors W4A16), or to GGUF; resumable, --part for many hosts."""
        gguf_args = {
            "type": gguf_type,
            "tensor_types": gguf_tensor_type,
            "mtp": gguf_mtp,
            "split": gguf_split_max_size,
            "dry_run": dry_run,
            "part": part,
        }
        _check_gguf_only(to, gguf_args)
        if to == "gguf":
            _gguf(model, out, gguf_args, workers, report, json)
            return
        from dsv3tools.converters.convert import ConvertOptions, convert_job, plan_summary, run_job

        opts = ConvertOptions(to, group_size, int4_scope, int4_method, scale_fmt)
        k_n = parse_part(part)
        ck, job = convert_job(model, out or default_out(model, to), opts)
        if dry_run:
            emit(dict(plan_summary(ck, job, opts), dry_run=True), json, _render)
            return
        with progress_bar(job.total_bytes, f"convert -> {to}", show_progress(json)) as advance:
            r = run_job(ck, job, opts, workers, k_n, report, on_shard=lambda shard, n: advance(n))
        emit(r, json, _render)
