"""Shared CLI plumbing: common options, default paths, JSON-or-table output, progress bars."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

DEFAULT_MODEL = "./DeepSeek-V3"

console = Console()
err_console = Console(stderr=True)


def model_option(help: str = "checkpoint folder (env DSV3TOOLS_MODEL)") -> Any:
    return typer.Option(DEFAULT_MODEL, "--model", envvar="DSV3TOOLS_MODEL", help=help)


def gated_config(model: str | Path) -> Any:
    """The config of ``--model`` (a checkpoint folder or a ``.gguf``) after its validation gate (SPEC sec.
    14), before any tokenizer or weight is loaded."""
    from dsv3tools.converters.gguf.files import is_gguf
    from dsv3tools.errors import DSV3Error
    from dsv3tools.model.api import model_config

    if not is_gguf(model) and not (Path(model) / "config.json").is_file():
        raise DSV3Error(f"--model {model}: no config.json; point --model at a checkpoint folder or a .gguf")
    return model_config(model)


def json_option() -> Any:
    return typer.Option(False, "--json", help="print one JSON object on stdout instead of tables")


def default_out(model: str | Path, step: str) -> Path:
    """A sibling of the model folder named after the step: ``./DeepSeek-V3`` -> ``./DeepSeek-V3-int4``."""
    m = Path(model)
    base = m.resolve().name or "model"
    return m.parent / f"{base}-{step}"


def parse_part(part: str | None) -> tuple[int, int] | None:
    """``"K/N"`` -> (K, N)."""
    if part is None:
        return None
    from dsv3tools.errors import DSV3Error

    try:
        k, n = (int(x) for x in part.split("/"))
    except ValueError:
        raise DSV3Error(f"--part {part!r}: expected K/N, e.g. 1/4") from None
    if not 1 <= k <= n:
        raise DSV3Error(f"--part {part}: K must be in 1..N")
    return k, n


def emit(result: Any, json_mode: bool, render: Callable[[Console, Any], None] | None = None) -> None:
    """Print ``result`` as one JSON object (``--json``) or with ``render`` (tables) otherwise."""
    if json_mode:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        sys.stdout.flush()
    elif render is not None:
        render(console, result)
    else:
        console.print_json(json.dumps(result, default=str))


def show_progress(json_mode: bool) -> bool:
    """Progress bars only on a terminal, never in --json mode."""
    return not json_mode and sys.stdout.isatty() and not os.environ.get("DSV3TOOLS_NO_PROGRESS")


@contextmanager
def progress_bar(
    total: float, description: str, enabled: bool, unit: str = "bytes"
) -> Iterator[Callable[[float], None]]:
    """A rich progress bar (bytes with rate and ETA, or a count); yields ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    cols = [TextColumn("{task.description}"), BarColumn()]
    cols += [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    cols.append(TimeRemainingColumn())
    with Progress(*cols, console=console, transient=False) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n: prog.advance(task, n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
