"""``dsv3tools split-mtp`` and ``dsv3tools merge-mtp``: the MTP layers into their own folder and back."""

from __future__ import annotations

from pathlib import Path

import typer

from dsv3tools.commands.common import default_out, emit, human_bytes, json_option, model_option


def _render_split(con, r: dict) -> None:
    head = "plan" if r["dry_run"] else "split"
    con.print(f"{head}: {r['model']} -> {r['out']}  (MTP layers {r['mtp_layers']})")
    con.print(
        f"MTP parameters: {r['mtp_params']:,} ({r['mtp_params_unique']:,} without the embed/head copies)"
    )
    for key in ("main", "mtp"):
        p = r[key]
        con.print(
            f"  {key}: {p['tensors']:,} tensors, {human_bytes(p['bytes'])} in {len(p['shards'])} shards -> {p['out']}"
        )
        if r["dry_run"]:
            for s in p["shards"]:
                con.print(f"    {s['file']}: {s['tensors']} tensors, {human_bytes(s['bytes'])}")
    con.print(f"total {human_bytes(r['bytes'])}")


def _render_merge(con, r: dict) -> None:
    head = "plan" if r["dry_run"] else "merged"
    con.print(f"{head}: {r['main']} + {r['mtp']} -> {r['out']}")
    if r["dry_run"]:
        for s in r["shards"]:
            con.print(f"  {s['file']}: {s['tensors']} tensors, {human_bytes(s['bytes'])}")
    con.print(f"{r['tensors']:,} tensors, {human_bytes(r['bytes'])} in {len(r['shards'])} shards")


def register(app: typer.Typer) -> None:
    @app.command("split-mtp")
    def split_cmd(
        model: str = model_option(),
        out: Path = typer.Option(None, "--out", help="output folder (default: sibling <model>-split)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the plan, write nothing"),
        json: bool = json_option(),
    ) -> None:
        """Write OUT/main (no MTP, num_nextn_predict_layers 0) and OUT/mtp (the MTP layers only)."""
        from dsv3tools.converters.mtp_split import split_mtp

        emit(split_mtp(model, out or default_out(model, "split"), dry_run), json, _render_split)

    @app.command("merge-mtp")
    def merge_cmd(
        main: Path = typer.Option(..., "--main", help="the split's main folder"),
        mtp: Path = typer.Option(..., "--mtp", help="the split's mtp folder"),
        out: Path = typer.Option(None, "--out", help="output folder (default: <X>-merged beside X-split)"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the plan, write nothing"),
        json: bool = json_option(),
    ) -> None:
        """The inverse of split-mtp: every tensor byte-identical to the original, the original config."""
        from dsv3tools.converters.mtp_split import default_merge_out, merge_mtp

        emit(merge_mtp(main, mtp, out or default_merge_out(main), dry_run), json, _render_merge)
