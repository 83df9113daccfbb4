"""``dsv3tools reshard``: lay a checkpoint out over N GPUs (SPEC sec. 6)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from dsv3tools.commands.common import (
    default_out,
    emit,
    human_bytes,
    json_option,
    model_option,
    progress_bar,
    show_progress,
)


def _render(con: Console, r: dict) -> None:
    pl = r["placement"]
    verb = "would write" if r["dry_run"] else "wrote"
    con.print(
        f"[bold]{r['out']}[/]: {verb} {r['num_ranks']} ranks, format {r['format']}, policy {pl['policy']}, "
        f"{pl['num_physical']} physical expert slots per MoE layer ({len(pl['layers'])} MoE layers)"
    )
    t = Table(title="bytes per rank")
    t.add_column("rank", justify="right")
    t.add_column("bytes", justify="right")
    for i, b in enumerate(r["bytes_per_rank"]):
        t.add_row(str(i), f"{human_bytes(b)} ({b:,})")
    con.print(t)
    con.print(
        f"total {human_bytes(r['total_bytes'])} ({r['total_bytes']:,} bytes) = source {r['source_bytes']:,}"
        f" - dropped MTP {r['dropped_bytes']:,} + redundant replicas {r['replica_bytes']:,}"
        f" + whole tensors copied to every rank {r['whole_copy_bytes']:,}"
    )
    imb = [v["imbalance"] for v in pl["layers"].values()]
    eplb = [v.get("imbalance_eplb", v["imbalance"]) for v in pl["layers"].values()]
    if imb:
        con.print(
            f"imbalance (max rank load / mean): mean {sum(imb) / len(imb):.4f}, max {max(imb):.4f}"
            f"; EPLB baseline mean {sum(eplb) / len(eplb):.4f}, max {max(eplb):.4f}"
        )


def register(app: typer.Typer) -> None:
    @app.command("reshard")
    def reshard_cmd(
        model: str = model_option(),
        gpus: int = typer.Option(..., "--gpus", help="number of ranks (GPUs)"),
        nodes: int = typer.Option(1, "--nodes", help="number of nodes (hierarchical placement when > 1)"),
        redundant: int = typer.Option(0, "--redundant-experts", help="extra expert replicas per MoE layer"),
        expert_load: str = typer.Option(
            None, "--expert-load", help="tokens per expert (expert-load JSON, SGLang dump, table)"
        ),
        policy: str = typer.Option("ours", "--policy", help="ours | eplb"),
        fmt: str = typer.Option("dsv3tools", "--format", help="dsv3tools | deepseek"),
        no_mtp: bool = typer.Option(
            False, "--no-mtp", help="drop the MTP layer (always dropped for --format deepseek)"
        ),
        out: Path = typer.Option(None, "--out", help="output folder (default: sibling <model>-ep<N>)"),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="print the placement and bytes per rank; write nothing"
        ),
        workers: int = typer.Option(1, "--workers", help="shards written in parallel"),
        json: bool = json_option(),
    ) -> None:
        """Place experts (with redundant replicas) and write what each of N GPUs loads."""
        from dsv3tools.converters.reshard import ReshardOptions, plan_reshard, reshard

        opt = ReshardOptions(gpus, nodes, redundant, expert_load, policy, fmt, not no_mtp)
        target = out or default_out(model, f"ep{gpus}")
        if dry_run:
            r = reshard(model, target, opt, dry_run=True)
        else:
            plan = plan_reshard(model, opt)
            total = sum(s.nbytes for rs in plan["shards"] for s in rs)
            with progress_bar(total, "reshard", show_progress(json)) as advance:
                r = reshard(model, target, opt, workers=workers, on_shard=lambda s, n: advance(n), plan=plan)
        emit(r, json, _render)
