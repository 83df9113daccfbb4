"""``dsv3tools synth``."""

from __future__ import annotations

from pathlib import Path

import typer

from dsv3tools.commands.common import emit, human_bytes, json_option


def register(app: typer.Typer) -> None:
    @app.command("synth")
    def synth_cmd(
        out: Path = typer.Option(..., "--out", help="output folder"),
        preset: str = typer.Option("tiny", "--preset", help="tiny | small | real-shape | full"),
        family: str = typer.Option(
            "v3", "--family", help="v3 | v3.1 | v3.2 | kimi-k2 | kimi-k2-thinking | moonlight (SPEC sec. 10)"
        ),
        sparse: bool = typer.Option(False, "--sparse", help="with --preset full: data regions are holes"),
        dtype: str = typer.Option(
            None, "--dtype", help="fp8 | bf16 | int4 (default: as the member's release stores it)"
        ),
        seed: int = typer.Option(0, "--seed"),
        layers: int = typer.Option(None, "--layers", help="cut num_hidden_layers (real-shape)"),
        experts: int = typer.Option(None, "--experts", help="cut n_routed_experts (real-shape)"),
        json: bool = json_option(),
    ) -> None:
        """Write a random checkpoint in the exact HF format of a family member, deterministic per seed."""
        from dsv3tools.checkpoint.synth import synthesize

        r = synthesize(
            out,
            preset=preset,
            seed=seed,
            sparse=sparse,
            dtype=dtype,
            layers=layers,
            experts=experts,
            family=family,
        )
        emit(
            r,
            json,
            lambda con, r: con.print(
                f"wrote {r['out']}: {r['tensors']:,} tensors, {human_bytes(r['bytes'])} in {r['shards']} shards"
            ),
        )
