"""The distributed forward over a resharded checkpoint: torchrun with 2 and 4 gloo ranks gives the
single-process logits (full forward, KV-cache decoding, MTP) with and without redundant experts."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dsv3tools.converters.reshard import ReshardOptions, reshard
from dsv3tools.errors import DSV3Error
from dsv3tools.model.api import load_model
from dsv3tools.model.distributed import is_resharded, load_resharded
from dsv3tools.model.parallel import ExpertParallelMoE

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from dist_worker import run as run_checks  # noqa: E402


def _skewed_loads(path: Path, src: Path) -> Path:
    cfg = load_model(src).config
    e = cfg.n_routed_experts
    path.write_text(
        json.dumps(
            {"layers": {str(x): [float((i * 5) % 7 + 1) ** 3 for i in range(e)] for x in cfg.moe_layers}}
        )
    )
    return path


@functools.cache
def _reference(src: Path) -> dict[str, torch.Tensor]:
    """The single-process model's outputs (float32 compute), once per checkpoint."""
    return run_checks(load_model(src, dtype=torch.float32))


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return a.shape == b.shape and float((a.float() - b.float()).abs().max()) <= rel * float(
        a.float().abs().max()
    )


@pytest.mark.parametrize(
    "which, n, redundant", [("bf16", 2, 0), ("bf16", 4, 4), ("fp8-wide", 2, 2), ("fp8", 4, 4)]
)
def test_torchrun_matches_single_process(which, n, redundant, tiny_bf16, tiny_fp8, tiny_wide_fp8, tmp_path):
    """fp8-wide: every TP split falls on 128-blocks (FP8 slices + split scales on each rank); fp8 (tiny):
    q_b_proj, o_proj and the shared expert would cut a block at N=4 and are stored whole, sliced at load."""
    src = {"bf16": tiny_bf16, "fp8": tiny_fp8, "fp8-wide": tiny_wide_fp8}[which]
    out = tmp_path / "ep"
    opt = ReshardOptions(n, num_redundant=redundant, expert_load=str(_skewed_loads(tmp_path / "l.json", src)))
    res = reshard(src, out, opt)
    if redundant:
        assert any(len(set(v["phy2log"])) < len(v["phy2log"]) for v in res["placement"]["layers"].values())
    assert bool(res["unsplit"]) == (which == "fp8")
    dest = tmp_path / "logits.pt"
    env = {
        k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(n),
        str(TESTS / "dist_worker.py"),
        str(out),
        str(dest),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS="1"), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ready rank") == 1 and "ready rank 0 of" in r.stdout  # only rank 0 prints
    got = torch.load(dest)
    ref = _reference(src)
    assert sorted(got) == sorted(ref) and "mtp" in ref
    for key in ("logits", "decode", "mtp"):
        assert _close(ref[key], got[key]), key
    assert torch.equal(ref["routing"], got["routing"])


def test_each_pair_goes_to_one_replica_of_its_expert(tiny_bf16):
    cfg = load_model(tiny_bf16).config
    e = cfg.n_routed_experts
    phy2log = list(range(e)) + [3, 3, 5, 0]  # expert 3 has 3 replicas, 5 and 0 two
    moe = ExpertParallelMoE(cfg, phy2log, rank=0, world=4)
    idx = torch.tensor([[3, 5], [3, 0], [3, 1], [3, 5]])
    slots = moe.choose_slots(idx)
    assert all(phy2log[s] == i for s, i in zip(slots.flatten().tolist(), idx.flatten().tolist(), strict=True))
    assert slots[:, 0].tolist() == [3, 16, 17, 3]  # token t uses replica t mod 3 of expert 3
    assert slots[:, 1].tolist() == [5, 19, 1, 18]
    assert (moe.lo, moe.hi) == (0, 5) and sorted(moe.slots) == [str(s) for s in range(5)]


def test_single_rank_group_in_process(tiny_bf16, tmp_path, monkeypatch):
    """World size 1 (gloo, in this process): the same loader and modules, the reference logits; a folder
    for 2 ranks is refused with the torchrun command to use."""
    one, two = tmp_path / "ep1", tmp_path / "ep2"
    reshard(tiny_bf16, one, ReshardOptions(1, num_redundant=2))
    reshard(tiny_bf16, two, ReshardOptions(2))
    assert is_resharded(one) and not is_resharded(tiny_bf16)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(DSV3Error, match="torchrun --nproc-per-node"):
        load_resharded(one)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        got = run_checks(load_resharded(one, dtype=torch.float32))
        with pytest.raises(DSV3Error, match="nproc-per-node 2"):
            load_resharded(two)
    finally:
        dist.destroy_process_group()
    ref = _reference(tiny_bf16)
    for key in ("logits", "decode", "mtp"):
        assert _close(ref[key], got[key]), key
