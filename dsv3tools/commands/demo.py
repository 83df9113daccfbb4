"""``dsv3tools demo``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from dsv3tools.commands.common import console, emit, json_option


def _render(con: Console, r: dict) -> None:
    t = Table(title="dsv3tools demo: trained tiny DeepSeek-V3, fp8 vs int4")
    t.add_column("check")
    t.add_column("result", justify="right")
    ev, cmp, mtp, rs, sp = r["eval"], r["compare"], r["mtp_bench"], r["reshard"], r["split_mtp"]
    t.add_row("accuracy fp8 (tinyfacts)", f"{ev['fp8']:.3f}")
    t.add_row("accuracy int4 (tinyfacts)", f"{ev['int4']:.3f}")
    t.add_row("KL int4 vs fp8 (mean / max)", f"{cmp['kl_mean']:.5f} / {cmp['kl_max']:.5f}")
    t.add_row("top-1 agreement int4 vs fp8", f"{cmp['top1_agreement']:.3f}")
    t.add_row(
        "MTP alpha (k=1), trained / untrained", f"{mtp['alpha']:.3f} / {mtp['alpha_untrained_mtp']:.3f}"
    )
    t.add_row("MTP tau (k=1)", f"{mtp['tau']:.3f}")
    t.add_row("speculative decoding lossless", str(mtp["lossless"]))
    t.add_row(
        f"resharded logits equal ({rs['ranks']} ranks)",
        f"{rs['logits_equal']} (rel {rs['max_rel_diff']:.1e})",
    )
    t.add_row("split-mtp then merge byte-identical", str(sp["merge_identical"]))
    t.add_row("total time", f"{sum(r['seconds'].values()):.0f} s")
    con.print(t)


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        workdir: Path = typer.Option(Path("demo-work"), "--workdir", help="folder for the demo's outputs"),
        json: bool = json_option(),
    ) -> None:
        """The whole pipeline on an embedded tiny checkpoint (trained once, then cached), offline."""
        import os

        os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-request progress bars
        from dsv3tools.demo.run import run_demo

        def on_step(name: str, res: dict) -> None:
            if not json:
                console.print(f"[green]done[/] {name}")

        emit(run_demo(workdir, on_step), json, _render)
