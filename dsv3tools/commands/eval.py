"""``dsv3tools eval``: lm-eval (MMLU, the shipped tinyfacts, local task YAMLs) through the built-in forward."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from dsv3tools.commands.common import emit, gated_config, json_option, model_option
from dsv3tools.errors import DSV3Error


def _render(con: Console, r: dict) -> None:
    con.print(f"model {r['model']}  (tokenizer {r['tokenizer']}, BOS {r['bos_policy']})")
    t = Table(title=f"{r['task']} ({r['num_fewshot']}-shot)")
    t.add_column("task / group")
    t.add_column("n", justify="right")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for name, metrics in r["metrics"].items():
        for k, v in metrics.items():
            t.add_row(name, str(r["n_samples"].get(name, "")), k, f"{v:.4f}")
    con.print(t)
    if r.get("output"):
        con.print(f"lm-eval results written to {r['output']}")


def _limit(limit: str | None) -> int | float | None:
    if limit is None:
        return None
    try:
        v = float(limit)
    except ValueError:
        raise DSV3Error(
            f"--limit {limit!r}: a number of documents per task (or a fraction below 1)"
        ) from None
    return int(v) if v >= 1 else v


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        model: str = model_option(),
        task: str = typer.Option(..., "--task", help="mmlu, tinyfacts, or a task name from --tasks-dir"),
        num_fewshot: int = typer.Option(None, "--num-fewshot", help="few-shot examples (MMLU default 5)"),
        limit: str = typer.Option(None, "--limit", help="documents per task (or a fraction)"),
        batch_size: int = typer.Option(8, "--batch-size", min=1),
        tasks_dir: Path = typer.Option(None, "--tasks-dir", help="folder of extra lm-eval task YAMLs"),
        mmlu_dir: Path = typer.Option(
            None, "--mmlu-dir", help="local cais/mmlu snapshot (per-subject parquet)"
        ),
        output: Path = typer.Option(None, "--output", help="write lm-eval's results JSON here"),
        dtype: str = typer.Option("bfloat16", "--dtype", help="compute dtype: bfloat16, float16 or float32"),
        json_mode: bool = json_option(),
    ) -> None:
        """Score a checkpoint with lm-evaluation-harness (MMLU 5-shot by default for --task mmlu)."""
        import os

        from dsv3tools.commands.common import show_progress

        if not show_progress(json_mode):
            os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars
        from dsv3tools.evals.tasks import prepare_tasks, run_eval, summarize

        with tempfile.TemporaryDirectory(prefix="dsv3tools-eval-") as work:
            tm = prepare_tasks(
                task, work, tasks_dir=tasks_dir, mmlu_dir=mmlu_dir
            )  # fails fast, before loading
            gated_config(model)
            from dsv3tools.evals.lm import DSV3LM

            lm = DSV3LM(pretrained=model, batch_size=batch_size, dtype=dtype)
            results = run_eval(lm, task, tm, num_fewshot=num_fewshot, limit=_limit(limit))
        summary = summarize(results)
        if output is not None:
            from lm_eval.utils import handle_non_serializable

            from dsv3tools.checkpoint.fsutil import atomic_write_bytes

            data = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
            output.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(output, data.encode())
        shots = num_fewshot if num_fewshot is not None else max(summary["n_shot"].values(), default=0)
        emit(
            {
                "model": model,
                "task": task,
                "num_fewshot": shots,
                "limit": limit,
                "tokenizer": lm.tokenizer_.kind,
                "bos_policy": "prepend" if lm.tokenizer_.add_bos else "none",
                **summary,
                "output": str(output) if output else None,
            },
            json_mode,
            _render,
        )
