"""``dsv3tools inspect``: a checkpoint folder or a GGUF model (SPEC sec. 2, 12)."""

from __future__ import annotations

from collections.abc import Callable

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dsv3tools.commands.common import (
    emit,
    human_bytes,
    json_option,
    model_option,
    progress_bar,
    show_progress,
)
from dsv3tools.errors import DSV3Error, ValidationError


def _render(con: Console, r: dict) -> None:
    con.print(
        f"[bold]{r['path']}[/]  {r['family']}  format {r['format']}  {r['num_shards']} shards  {r['num_tensors']:,} tensors  "
        f"{human_bytes(r['bytes_total'])}"
    )
    t = Table(title="parameters by component")
    t.add_column("component")
    t.add_column("params", justify="right")
    t.add_column("formats")
    for c, v in r["components"].items():
        t.add_row(c, f"{v['params']:,}", ", ".join(f"{k} x{n}" for k, n in v["formats"].items()))
    t.add_row("[bold]main[/]", f"{r['params_main']:,}", "")
    t.add_row("[bold]MTP[/]", f"{r['params_mtp']:,}", f"unique {r['params_mtp_unique']:,}")
    con.print(t)
    m = Table(title="weight memory per GPU (even split)")
    m.add_column("format")
    gpus = list(next(iter(r["memory"].values()))["per_gpu_bytes"])
    for n in gpus:
        m.add_column(f"{n} GPU", justify="right")
    for fmt, v in r["memory"].items():
        m.add_row(fmt, *(human_bytes(v["per_gpu_bytes"][n]) for n in gpus))
    con.print(m)
    con.print(
        f"KV cache: {r['kv_cache_bytes_per_token']:,} bytes per token (bf16, "
        f"{r['kv_cache_values_per_token_per_layer']} values per token per layer)"
    )
    for p in r["problems"][:20]:
        con.print(f"[red]problem:[/] {p}")
    if len(r["problems"]) > 20:
        con.print(f"[red]... {len(r['problems']) - 20} more problems[/]")
    _render_zeros(con, r)


def _render_gguf(con: Console, r: dict) -> None:
    con.print(
        f"[bold]{escape(r['path'])}[/]  {r['architecture']} ({r['family']})  gguf {r['file_type']}  "
        f"{r['num_files']} files  {r['num_tensors']:,} tensors  {human_bytes(r['bytes_total'])}  "
        f"{r['bits_per_weight']:.2f} bits/weight",
        highlight=False,
    )
    t = Table(title="parameters by component")
    for col in ("component", "params", "bytes", "bits/weight", "types"):
        t.add_column(col, justify="left" if col in ("component", "types") else "right")
    for c, v in r["components"].items():
        types = ", ".join(f"{k} x{n}" for k, n in v["types"].items())
        t.add_row(c, f"{v['params']:,}", human_bytes(v["bytes"]), f"{v['bits_per_weight']:.2f}", types)
    t.add_row("[bold]main[/]", f"{r['params_main']:,}", "", "", "")
    t.add_row("[bold]MTP[/]", f"{r['params_mtp']:,}", "", "", "")
    con.print(t)
    con.print(
        f"KV cache: {r['kv_cache_bytes_per_token']:,} bytes per token (bf16, "
        f"{r['kv_cache_values_per_token_per_layer']} values per token per layer)"
    )
    _render_problems(con, r)
    _render_zeros(con, r)


def _render_zeros(con: Console, r: dict) -> None:
    zeros = r.get("zero_tensors", [])
    if zeros:
        more = f" (+{len(zeros) - 1} more)" if len(zeros) > 1 else ""
        con.print(
            f"[yellow]warning:[/] {len(zeros)} all-zero tensors: {escape(zeros[0])}{more}", highlight=False
        )


def _render_problems(con: Console, r: dict) -> None:
    for p in r["problems"]:
        con.print(f"[red]problem:[/] {escape(p)}", highlight=False)


def _readers(model: str) -> tuple[Callable, Callable, Callable]:
    """(report, data scan, renderer) for what ``model`` is: a GGUF model or a checkpoint folder."""
    from dsv3tools.converters.gguf.files import is_gguf

    if is_gguf(model):
        from dsv3tools.converters.gguf.report import check_gguf_data, inspect_gguf

        return inspect_gguf, check_gguf_data, _render_gguf
    from dsv3tools.checkpoint.data_check import check_data
    from dsv3tools.checkpoint.inspect import inspect_checkpoint

    return inspect_checkpoint, check_data, _render


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def inspect_cmd(
        model: str = model_option(),
        check_data: bool = typer.Option(
            False,
            "--check-data",
            help="also read every tensor once: NaN/Inf values (exit 2), all-zero tensors",
        ),
        json: bool = json_option(),
    ) -> None:
        """Parameters, bytes, formats, memory per GPU count and validation problems, from headers only (a
        .gguf: its types, bytes and bits per weight by component)."""
        report, scan, render = _readers(model)
        try:
            r = report(model)
        except ValidationError as e:  # broken files, index or config: list every failure, then exit 2
            emit({"path": model, "problems": e.problems}, json, _render_problems)
            raise
        if check_data:
            with progress_bar(r["bytes_total"], "check-data", show_progress(json)) as advance:
                data = scan(model, progress=advance)
            r["problems"] += data["problems"]
            r["zero_tensors"] = data["zero_tensors"]
        emit(r, json, render)
        if r["problems"]:
            more = f" (+{len(r['problems']) - 1} more)" if len(r["problems"]) > 1 else ""
            raise DSV3Error(f"{model}: {r['problems'][0]}{more}")
