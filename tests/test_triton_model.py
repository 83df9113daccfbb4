"""The tiny fp8 and int4 checkpoints give the same logits through the Triton kernels (interpreted on CPU)
as through their PyTorch twins: the model's ``linear()`` dispatch end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3tools.converters.convert import ConvertOptions, convert

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_triton_path_matches_twins(fmt: str, tiny_fp8: Path, tmp_path: Path) -> None:
    ckpt = tiny_fp8
    if fmt == "int4":
        ckpt = tmp_path / "int4"
        convert(tiny_fp8, ckpt, ConvertOptions(to="int4", int4_scope="all"), workers=1)
    out = tmp_path / "logits.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "triton_model_worker.py"), str(ckpt), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(out)
    tri, twin = res["triton"], res["torch"]
    assert tri.shape == twin.shape and torch.isfinite(tri).all()
    rel = float((tri - twin).abs().max() / twin.abs().max())
    assert rel < 1e-4, f"{fmt}: Triton vs twin logits differ by {rel:.2e} relative"
    assert not torch.equal(twin, torch.zeros_like(twin))
