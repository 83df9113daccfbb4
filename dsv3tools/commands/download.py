"""The ``dsv3tools download`` command: argument parsing, the byte progress bar and the report.
The work itself (plan, free-disk check, parallel fetch, verification) is ``dsv3tools.hub.download``, imported
when the command runs (huggingface_hub and its HTTP stack take ~0.45 s to import; other commands skip it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from dsv3tools.commands.common import (
    DEFAULT_MODEL,
    emit,
    human_bytes,
    json_option,
    progress_bar,
    show_progress,
)
from dsv3tools.errors import DSV3Error
from dsv3tools.hub.select import DEFAULT_REPO

if TYPE_CHECKING:
    from dsv3tools.hub import download as dl

_gb = human_bytes


def _say(json_mode: bool, text: str) -> None:
    if not json_mode:
        typer.echo(text)


def _plan_line(p: dl.Plan) -> str:
    return (
        f"{p.repo}@{p.commit[:12]} ({p.revision}) -> {p.local_dir}: {len(p.files)} files, {_gb(p.total_bytes)}; "
        f"to fetch {len(p.fetch)} files, {_gb(p.fetch_bytes)}; free {_gb(p.free_bytes)}"
    )


def _verify_plan(
    repo: str | None, revision: str | None, local_dir: Path, include: list[str] | None
) -> dl.Plan:
    """Verify what an earlier download recorded (its repo, commit and files) unless told otherwise."""
    from dsv3tools.hub import download as dl

    state = dl.read_state(local_dir)
    repo = repo or state.get("repo") or DEFAULT_REPO
    revision = revision or state.get("commit") or "main"
    p = dl.plan(repo, revision, local_dir, include, offline_ok=True)
    recorded = set(state.get("files", {}))
    if include is None and recorded:
        p.files = [f for f in p.files if f.name in recorded]
        p.fetch = [n for n in p.fetch if n in recorded]
    return p


def run_download(
    repo: str | None,
    revision: str | None,
    local_dir: Path,
    include: list[str] | None,
    dry_run: bool,
    verify_only: bool,
    max_workers: int,
    json_mode: bool,
) -> dict:
    """The command body; returns the JSON report (raises DSV3Error on bad input or failed files)."""
    from dsv3tools.hub import download as dl

    bar_on = show_progress(json_mode)
    if verify_only:
        p = _verify_plan(repo, revision, local_dir, include)
        _say(
            json_mode,
            f"verifying {len(p.files)} files ({_gb(p.total_bytes)}) in {local_dir} against {p.repo}@{p.commit[:12]}",
        )
        with progress_bar(p.total_bytes, "verify", bar_on) as advance:
            result = dl.verify(p, max_workers=max_workers, progress=dl.Progress(advance=advance))
        return _finish(result, json_mode, "verify")
    p = dl.plan(repo or DEFAULT_REPO, revision or "main", local_dir, include)
    _say(json_mode, _plan_line(p))
    if dry_run:
        report = p.to_dict() | {"mode": "dry-run"}
        if json_mode:
            emit(report, json_mode)
        return report
    dl.check_disk(p)
    with progress_bar(p.fetch_bytes, "download", bar_on) as advance:
        result = dl.execute(p, max_workers=max_workers, progress=dl.Progress(advance=advance))
    return _finish(result, json_mode, "download")


def _finish(result: dl.Result, json_mode: bool, mode: str) -> dict:
    from dsv3tools.checkpoint.validate import validate_checkpoint
    from dsv3tools.hub import download as dl

    report = result.to_dict() | {"mode": mode, "state_file": str(result.plan.local_dir / dl.STATE)}
    if json_mode:
        emit(report, json_mode)
    else:
        r = result
        typer.echo(
            f"{mode}: fetched {len(r.fetched)}, re-fetched {len(r.refetched)}, already verified {len(r.skipped)}, "
            f"failed {len(r.failed)}; {_gb(r.fetched_bytes)} in {r.seconds:.1f} s; commit {r.plan.commit} recorded in {report['state_file']}"
        )
    if result.failed:
        name, reason = next(iter(sorted(result.failed.items())))
        more = f" (and {len(result.failed) - 1} more)" if len(result.failed) > 1 else ""
        fix = (
            "run `dsv3tools download` to fetch them again"
            if mode == "verify"
            else "check the hub or mirror and re-run"
        )
        raise DSV3Error(f"{result.plan.local_dir / name}: {reason}{more}; {fix}")
    # a whole checkpoint on disk, every file as the hub has it: the validation gate too
    if result.plan.include == ["all"]:
        validate_checkpoint(result.plan.local_dir)
    return report


def register(app: typer.Typer) -> None:
    """Add ``download`` to the dsv3tools CLI."""

    @app.command("download")
    def download(
        repo: str = typer.Option(None, "--repo", help=f"hub repo id (default {DEFAULT_REPO})"),
        revision: str = typer.Option(None, "--revision", help="branch, tag or commit sha (default main)"),
        local_dir: Path = typer.Option(
            DEFAULT_MODEL, "--local-dir", envvar="DSV3TOOLS_MODEL", help="target folder (env DSV3TOOLS_MODEL)"
        ),
        include: list[str] = typer.Option(
            None, "--include", help="all | config | main | mtp | layers:A-B (repeatable)"
        ),
        dry_run: bool = typer.Option(
            False, "--dry-run", help="print the plan (files, bytes, free disk) and stop"
        ),
        verify_only: bool = typer.Option(
            False, "--verify-only", help="hash the local files against the hub; fetch nothing"
        ),
        max_workers: int = typer.Option(8, "--max-workers", help="files fetched in parallel"),
        json_mode: bool = json_option(),
    ) -> None:
        """Fetch the checkpoint (or a subset) through huggingface_hub: resumable, disk-checked, verified."""

        run_download(
            repo, revision, Path(local_dir), include or None, dry_run, verify_only, max_workers, json_mode
        )
