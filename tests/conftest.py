"""Shared fixtures: tiny synthetic checkpoints (built once per session) and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python -m pytest` puts the repository root first on sys.path, where the source folders kernels/ and
# evals/ would shadow the PyPI packages of those names (transformers imports `kernels`): the root moves to
# the end (the package itself is installed; only `tests.*` is imported from the root).
_ROOT_ENTRIES = [p for p in sys.path if Path(p or ".").resolve() == ROOT]
sys.path[:] = [p for p in sys.path if p not in _ROOT_ENTRIES] + _ROOT_ENTRIES

import pytest  # noqa: E402

from dsv3tools.checkpoint.synth import synthesize  # noqa: E402


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


# SPEC sec. 5: the compressed-tensors weights scheme of an int4 config group, written out for the tests
SPEC_INT4_WEIGHTS = {
    "num_bits": 4,
    "type": "int",
    "symmetric": True,
    "strategy": "group",
    "group_size": 128,
    "dynamic": False,
    "actorder": None,
    "observer": "minmax",
    "observer_kwargs": {},
    "block_structure": None,
}

# tiny, with enough heads and shared-expert rows that every tensor-parallel split at N = 2 and 4 falls on
# whole 128-row FP8 blocks
WIDE_OVERRIDES = {"num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 4}


@pytest.fixture(scope="session")
def tiny_wide_fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FP8 tiny with 16 heads and a 512-row shared expert (read-only)."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny-wide-fp8"
    synthesize(out, preset="tiny", seed=0, overrides=WIDE_OVERRIDES)
    return out


def raw_tensors(folder: Path) -> dict[str, bytes]:
    """Every stored tensor's bytes, read straight from the shard files through their headers."""
    from dsv3tools.checkpoint.reader import Checkpoint

    ck = Checkpoint(folder)
    out = {}
    for shard in ck.shards:
        data = (folder / shard).read_bytes()
        base = 8 + int.from_bytes(data[:8], "little")
        for name, info in ck.header(shard).items():
            out[name] = data[base + info.offsets[0] : base + info.offsets[1]]
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


def rss_file_kib() -> int:
    """This process's file-backed resident memory (``RssFile`` in /proc/self/status, Linux >= 4.5), KiB."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("RssFile:", 1)[1].split()[0])
