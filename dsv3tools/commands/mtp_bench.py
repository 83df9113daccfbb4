"""``dsv3tools mtp-bench``: MTP speculative decoding against plain greedy (SPEC sec. 8)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from dsv3tools.commands.common import emit, gated_config, json_option, model_option
from dsv3tools.errors import DSV3Error


def read_prompts(path: Path | None) -> list[str]:
    """Prompts, one per line (``.jsonl``: objects with a ``prompt`` field); default: the shipped set."""
    if path is None:
        from dsv3tools.evals.tasks import data_dir

        path = data_dir() / "mtp_prompts.txt"
    if not Path(path).is_file():
        raise DSV3Error(
            f"--prompts {path}: no such file (one prompt per line, or .jsonl with a 'prompt' field)"
        )
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    if str(path).endswith(".jsonl"):
        try:
            lines = [json.loads(ln)["prompt"] for ln in lines]
        except (ValueError, KeyError, TypeError):
            raise DSV3Error(
                f"--prompts {path}: every line must be a JSON object with a 'prompt' string"
            ) from None
    if not lines:
        raise DSV3Error(f"--prompts {path}: no prompts")
    return lines


def _render(con: Console, r: dict) -> None:
    t = Table(
        title=f"MTP speculative decoding, k={r['k']}, {r['prompts']} prompts x {r['max_new_tokens']} tokens"
    )
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("alpha (draft acceptance)", f"{r['alpha']:.3f}"),
        ("tau (mean acceptance length)", f"{r['tau']:.3f}"),
    ]
    rows += [(f"acceptance at draft {i + 1}", f"{a:.3f}") for i, a in enumerate(r["per_position"])]
    if "alpha_untrained_mtp" in r:
        rows.append(("alpha, untrained MTP module", f"{r['alpha_untrained_mtp']:.3f}"))
    rows += [
        ("lossless (== plain greedy)", str(r["lossless"])),
        ("main forwards per token", f"{r['forwards_per_token']:.3f}"),
        ("wall speedup vs greedy", f"{r['speedup_wall']:.2f}x"),
    ]
    for row in rows:
        t.add_row(*row)
    con.print(t)


def register(app: typer.Typer) -> None:
    @app.command("mtp-bench")
    def mtp_bench_cmd(
        model: str = model_option(),
        prompts: Path = typer.Option(
            None, "--prompts", help="prompt file, one per line (default: shipped set)"
        ),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
        k: int = typer.Option(
            1, "--k", min=1, help="draft tokens per verify step (k > 1 chains the MTP module)"
        ),
        dtype: str = typer.Option("float32", "--dtype", help="compute dtype: float32, bfloat16 or float16"),
        untrained_baseline: bool = typer.Option(
            False,
            "--untrained-baseline",
            help="also report alpha with the MTP module's weights re-randomized",
        ),
        json_mode: bool = json_option(),
    ) -> None:
        """Draft with the MTP module, verify with the main model; acceptance (alpha, tau) and losslessness."""
        import torch

        from dsv3tools.checkpoint.tokenizer import load_tokenizer
        from dsv3tools.evals.lm import _torch_dtype, dequantize_small
        from dsv3tools.evals.mtp import bench, randomize_mtp
        from dsv3tools.model.api import load_model

        texts = read_prompts(prompts)
        if not gated_config(model).num_nextn_predict_layers:  # the validation gate, before any weight
            raise DSV3Error(
                f"--model {model}: no MTP layer (num_nextn_predict_layers 0); use a checkpoint with MTP"
                + (" (a GGUF keeps it with convert --to gguf --gguf-mtp)" if model.endswith(".gguf") else "")
            )
        m = load_model(model, dtype=_torch_dtype(dtype) or torch.float32)
        dequantize_small(m)
        tok = load_tokenizer(model)
        ids = [tok.encode(t) for t in texts]
        result = bench(m, ids, max_new_tokens, k)
        if untrained_baseline:
            randomize_mtp(m, seed=0)  # float weights: randomized layers simply replace the dequantized ones
            base = bench(m, ids, max_new_tokens, k)
            result.update(alpha_untrained_mtp=base["alpha"], tau_untrained_mtp=base["tau"])
        emit(dict(result, model=model), json_mode, _render)
