"""``dsv3tools expert-load``: tokens routed to each expert per MoE layer, for ``reshard --expert-load``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from dsv3tools.commands.common import emit, json_option, model_option


def _render(con: Console, r: dict) -> None:
    con.print(
        f"wrote {r['out']}: {r['prompts']} prompts, {r['tokens']} tokens, {len(r['layers'])} MoE layers"
    )
    for lid, row in list(r["layers"].items())[:4]:
        total = sum(row) or 1
        con.print(
            f"  layer {lid}: busiest expert {max(range(len(row)), key=row.__getitem__)} "
            f"with {max(row) / total:.1%} of the routed tokens"
        )


def register(app: typer.Typer) -> None:
    @app.command("expert-load")
    def expert_load_cmd(
        model: str = model_option(),
        prompts: Path = typer.Option(..., "--prompts", help="text file, one prompt per line"),
        out: Path = typer.Option(Path("expert-load.json"), "--out", help="output JSON file"),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
        max_tokens: int = typer.Option(
            4096, "--max-tokens", min=1, help="cut each prompt to this many tokens"
        ),
        json: bool = json_option(),
    ) -> None:
        """Run prompts through the forward and record tokens per expert per MoE layer."""
        from dsv3tools.checkpoint.writer import atomic_write_json
        from dsv3tools.model.expert_load import expert_load

        r = expert_load(model, prompts, device=device, max_tokens=max_tokens)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, r)
        emit({**r, "out": str(out)}, json, _render)
