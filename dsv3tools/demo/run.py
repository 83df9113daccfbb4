"""``dsv3tools demo``: the whole pipeline on the trained tiny checkpoint, offline.

trained tiny FP8 checkpoint -> inspect -> split-mtp (and merge back, byte-identical) -> convert to int4
-> reshard over 2 ranks and run them with torchrun (logits equal to one process) -> compare int4 vs
fp8 -> eval on the shipped multiple-choice task for both -> mtp-bench. Each step calls the same library
function as its command; ``on_step(name, result)`` reports progress.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

DEMO_TASK = "tinyfacts"
RANKS = 2


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def _tensors_equal(a: Path, b: Path) -> bool:
    """Every tensor of checkpoint ``a`` equals (bytes) the tensor of the same name in ``b``."""
    from dsv3tools.checkpoint.reader import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    if set(ca.weight_map) != set(cb.weight_map):
        return False
    return all(torch.equal(ca.get(n).view(torch.uint8), cb.get(n).view(torch.uint8)) for n in ca.weight_map)


def _step_split(ckpt: Path, work: Path) -> dict:
    from dsv3tools.converters.mtp_split import merge_mtp, split_mtp

    split = split_mtp(ckpt, work / "split")
    merge_mtp(work / "split" / "main", work / "split" / "mtp", work / "merged")
    return {
        "mtp_params": split["mtp_params"],
        "main_tensors": split["main"]["tensors"],
        "mtp_tensors": split["mtp"]["tensors"],
        "merge_identical": _tensors_equal(ckpt, work / "merged"),
    }


def _step_reshard(ckpt: Path, work: Path) -> dict:
    """Reshard over ``RANKS`` ranks (with redundant experts), run them under torchrun, compare logits."""
    from dsv3tools.converters.reshard import ReshardOptions, reshard
    from dsv3tools.model.api import load_model

    out = work / f"ep{RANKS}"
    res = reshard(ckpt, out, ReshardOptions(num_ranks=RANKS, num_redundant=RANKS))
    cfg_vocab = load_model(ckpt, dtype=torch.float32).config.vocab_size
    ids = torch.randint(5, cfg_vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, work / "reshard_ids.pt")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={RANKS}",
        "-m",
        "dsv3tools.demo.worker",
        str(out),
        str(work / "reshard_ids.pt"),
        str(work / "reshard_logits.pt"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    dist_logits = torch.load(work / "reshard_logits.pt")
    with torch.inference_mode():
        ref = load_model(ckpt, dtype=torch.float32)(ids)
    rel = float((dist_logits - ref).abs().max() / ref.abs().max())
    imb = [v["imbalance"] for v in res["placement"]["layers"].values()]
    return {
        "ranks": RANKS,
        "bytes_per_rank": res["bytes_per_rank"],
        "max_rel_diff": rel,
        "logits_equal": rel <= 1e-5,
        "imbalance_mean": sum(imb) / len(imb),
    }


def _step_eval(ckpt: Path, int4: Path, work: Path) -> dict:
    from dsv3tools.evals.lm import DSV3LM
    from dsv3tools.evals.tasks import prepare_tasks, run_eval, summarize

    tm = prepare_tasks(DEMO_TASK, work / "tasks")
    out = {}
    for name, path in (("fp8", ckpt), ("int4", int4)):
        lm = DSV3LM(pretrained=str(path), batch_size=16, dtype="float32")
        metrics = summarize(run_eval(lm, DEMO_TASK, tm))["metrics"][DEMO_TASK]
        out[name] = metrics["acc"]
    return out


def _step_mtp(ckpt: Path) -> dict:
    from dsv3tools.checkpoint.tokenizer import encode, load_tokenizer
    from dsv3tools.evals.mtp import bench, randomize_mtp
    from dsv3tools.evals.tasks import data_dir
    from dsv3tools.model.api import load_model

    model = load_model(ckpt, dtype=torch.float32)
    tok = load_tokenizer(ckpt)
    lines = [ln for ln in (data_dir() / "mtp_prompts.txt").read_text().splitlines() if ln.strip()]
    prompts = [encode(tok, p, model.config.bos_token_id) for p in lines[:8]]
    with torch.inference_mode():
        trained = bench(model, prompts, max_new_tokens=24, k=1)
        randomize_mtp(model)
        untrained = bench(model, prompts, max_new_tokens=24, k=1)
    return {
        "alpha": trained["alpha"],
        "tau": trained["tau"],
        "lossless": trained["lossless"],
        "alpha_untrained_mtp": untrained["alpha"],
        "speedup_wall": trained["speedup_wall"],
    }


def run_demo(workdir: str | Path, on_step: Callable[[str, dict], None] | None = None) -> dict:
    """Run every step in ``workdir`` (created; reused pieces are rebuilt) and return the summary."""
    from dsv3tools.checkpoint.inspect import inspect_checkpoint
    from dsv3tools.converters.convert import ConvertOptions, convert
    from dsv3tools.evals.train_tiny import trained_tiny
    from dsv3tools.model.compare import compare

    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report = on_step or (lambda name, result: None)
    summary: dict = {"workdir": str(work), "seconds": {}}

    def step(name: str, fn: Callable[[], dict]) -> dict:
        t0 = time.perf_counter()
        res = fn()
        summary["seconds"][name] = round(time.perf_counter() - t0, 1)
        summary[name] = res
        report(name, res)
        return res

    ckpt = Path(step("train", lambda: {"checkpoint": str(trained_tiny())})["checkpoint"])
    step(
        "inspect",
        lambda: {
            k: v
            for k, v in inspect_checkpoint(ckpt).items()
            if k in ("format", "params_main", "params_mtp", "num_tensors", "num_shards", "problems")
        },
    )
    step("split_mtp", lambda: _step_split(ckpt, work))
    int4 = work / "int4"
    step(
        "convert_int4",
        lambda: {
            k: v
            for k, v in convert(ckpt, int4, ConvertOptions(to="int4", int4_method="mse")).items()
            if k in ("complete", "bytes")
        },
    )
    step("reshard", lambda: _step_reshard(ckpt, work))
    step("compare", lambda: compare(ckpt, int4))
    step("eval", lambda: _step_eval(ckpt, int4, work))
    step("mtp_bench", lambda: _step_mtp(ckpt))
    return summary
