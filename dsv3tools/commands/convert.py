"""``dsv3tools convert``: fp8 blocks / bf16 / int4 / nvfp4 / mxfp4 / fp16, any to any other, streaming shard by shard."""

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


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert_cmd(
        model: str = model_option(),
        to: str = typer.Option(..., "--to", help="bf16 | fp8 | int4 | nvfp4 | mxfp4 | fp16"),
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
        json: bool = json_option(),
    ) -> None:
        """Convert between FP8 blocks, BF16, FP16, int4, NVFP4 and MXFP4 (compressed-tensors W4A16); resumable, --part for many hosts."""
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
