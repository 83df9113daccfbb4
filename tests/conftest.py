"""Shared fixtures: tiny synthetic checkpoints (built once per session) and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3tools.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset in FP8 (seed 0). Treat as read-only; copy it to modify."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny-fp8"
    synthesize(out, preset="tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset written directly in BF16 (seed 0). Read-only."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny-bf16"
    synthesize(out, preset="tiny", seed=0, dtype="bf16")
    return out


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m dsv3tools ARGS`` in a subprocess (the real exit codes and streams)."""
    full_env = dict(os.environ, DSV3TOOLS_NO_PROGRESS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "dsv3tools", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture
def cli():
    return run_cli
