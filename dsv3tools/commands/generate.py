"""``dsv3tools generate``."""

from __future__ import annotations

import typer

from dsv3tools.commands.common import emit, json_option, model_option


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_cmd(
        model: str = model_option(),
        prompt: str = typer.Option(..., "--prompt", help="text to continue (BOS is prepended)"),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy"),
        seed: int = typer.Option(0, "--seed", help="sampling seed"),
        mtp: bool = typer.Option(False, "--mtp", help="MTP speculative decoding (greedy)"),
        k: int = typer.Option(1, "--k", min=1, help="draft tokens per step with --mtp"),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
        offload: bool = typer.Option(False, "--offload", help="stream layers from disk (bounded memory)"),
        dtype: str = typer.Option("bfloat16", "--dtype", help="compute dtype: bfloat16, float16 or float32"),
        json: bool = json_option(),
    ) -> None:
        """Greedy (or sampled) text generation with the built-in forward."""
        from dsv3tools.errors import DSV3Error
        from dsv3tools.model.api import compute_dtype
        from dsv3tools.model.generate import run_generate

        if device not in ("cpu", "cuda"):
            raise DSV3Error(f"--device {device!r}: use cpu or cuda")
        r = run_generate(
            model,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            mtp=mtp,
            mtp_k=k,
            device=device,
            offload=offload,
            dtype=compute_dtype(dtype),
        )
        emit(r, json, lambda con, r: con.print(prompt + r["text"], markup=False, highlight=False))
