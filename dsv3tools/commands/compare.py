"""``dsv3tools compare``."""

from __future__ import annotations

from pathlib import Path

import typer

from dsv3tools.commands.common import emit, json_option, model_option


def _render(con, r: dict) -> None:
    from rich.table import Table

    t = Table(
        title=f"{r['model']} ({r['dtype']}) vs {r['against']} ({r['against_dtype']}): "
        f"{r['positions']} positions, {r['prompts']} prompts"
    )
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in ("kl_mean", "kl_max", "top1_agreement", "max_abs_logit_diff"):
        t.add_row(key, f"{r[key]:.6g}")
    con.print(t)


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_cmd(
        model: str = model_option("model A (env DSV3TOOLS_MODEL)"),
        against: str = typer.Option(..., "--against", help="model B"),
        prompts: Path = typer.Option(None, "--prompts", help="one prompt per line (or JSONL with 'prompt')"),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
        offload: bool = typer.Option(False, "--offload", help="stream layers from disk"),
        dtype: str = typer.Option(
            "float32", "--dtype", help="model A's compute dtype: float32, bfloat16, float16"
        ),
        against_dtype: str = typer.Option(
            None, "--against-dtype", help="model B's compute dtype (default: --dtype)"
        ),
        json: bool = json_option(),
    ) -> None:
        """Logit KL(A||B), top-1 agreement and max abs logit diff of two checkpoints (float32 compute unless
        --dtype says otherwise; a checkpoint against itself with two dtypes measures the dtype)."""
        from dsv3tools.model.api import compute_dtype
        from dsv3tools.model.compare import compare, read_prompts

        r = compare(
            model,
            against,
            read_prompts(prompts),
            device=device,
            offload=offload,
            dtype=compute_dtype(dtype),
            against_dtype=compute_dtype(against_dtype) if against_dtype else None,
        )
        emit(r, json, _render)
