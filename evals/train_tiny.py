"""Train a tiny DeepSeek-V3 on the generated corpus (:mod:`dsv3tools.evals.corpus`) and save it as an FP8
checkpoint in the real format; ``trained_tiny()`` caches the result so tests and the demo train once.

The model is the tiny preset (MLA, MoE with 16 experts in 4 groups, one MTP layer) with fewer main layers.
Training is deterministic (fixed seeds, data order, one thread) and runs in a child process with the CPU
code paths pinned (:data:`PINNED_ENV`: ATen's AVX2 kernels, MKL's AVX2 conditional-numerical-reproducibility
mode), because float32 rounding differs between AVX2 and AVX-512 kernels and 400 steps of training amplify
it into different weights (tinyfacts accuracy moves by a few questions). Loss: next-token plus
``mtp_lambda`` times the MTP loss (predicting token i+2 from the hidden state at i and token i+1), no
auxiliary balance loss; instead, after every step each MoE layer's router bias moves by
``bias_gamma * sign(mean load - load_e)`` (DeepSeek-V3's auxiliary-loss-free balancing).

Run: ``python -m dsv3tools.evals.train_tiny --out DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv3tools.evals import corpus
from dsv3tools.evals.corpus import CorpusConfig

REPORT = "train_report.json"
# read by torch and MKL at start-up only, so they are set for a child process: the same kernels (and so the same
# float32 rounding) on every x86-64 CPU with AVX2; ignored elsewhere (see the README on what varies)
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (all of it feeds the cache key)."""

    layers: int = 2  # main layers: layer 0 dense, layer 1 MoE; the MTP layer comes on top
    steps: int = 400
    batch: int = 16
    seq_len: int = 48
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    bias_gamma: float = 1e-3
    seed: int = 0
    threads: int = 1  # small ops: one thread beats two (and is immune to oversubscribed cores)
    train_lines: int = 20000
    heldout_lines: int = 2000
    heldout_seqs: int = 64
    corpus: CorpusConfig = field(default_factory=CorpusConfig)


def model_config(cfg: TrainConfig):
    """The tiny preset cut to ``cfg.layers`` main layers (FP8 quantization config, as saved)."""
    from dsv3tools.checkpoint.synth import preset_config
    from dsv3tools.config import ModelConfig

    return ModelConfig.from_dict(preset_config("tiny", layers=cfg.layers))


def _tokenizer():
    from tokenizers import Tokenizer

    from dsv3tools.checkpoint.tokenizer import tokenizer_files

    return Tokenizer.from_str(tokenizer_files()["tokenizer.json"].decode())


def pack(lines: list[str], n_seqs: int, seq_len: int, gen: torch.Generator, bos: int = 0) -> torch.Tensor:
    """``n_seqs`` sequences ``[BOS] + line + "\\n" + line ...`` of ``seq_len`` tokens, each starting at a
    random line (so prompts at the start of a sequence look like the task's prompts)."""
    tok = _tokenizer()
    enc = [tok.encode(line + "\n", add_special_tokens=False).ids for line in lines]
    out = torch.empty(n_seqs, seq_len, dtype=torch.long)
    starts = torch.randint(0, len(enc), (n_seqs,), generator=gen).tolist()
    for r, i in enumerate(starts):
        seq = [bos]
        while len(seq) < seq_len:
            seq += enc[i % len(enc)]
            i += 1
        out[r] = torch.tensor(seq[:seq_len])
    return out


def losses(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token CE, MTP CE predicting i+2 from hidden i and token i+1), means over positions."""
    logits, hidden = model(ids, return_hidden=True)
    main = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    mtp_logits, _ = model.mtp_forward(hidden[:, :-2], ids[:, 1:-1])
    mtp = F.cross_entropy(mtp_logits.flatten(0, 1), ids[:, 2:].flatten())
    return main, mtp


def unigram_ce(train: torch.Tensor, heldout: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats/token) of the add-one unigram distribution of the training targets on held-out targets."""
    counts = torch.bincount(train[:, 1:].flatten(), minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[heldout[:, 1:].flatten()].mean())


def balance_router_bias(model, gamma: float) -> None:
    """Aux-loss-free balancing: ``bias_e += gamma * sign(mean_load - load_e)`` per MoE layer, then reset."""
    for layer, counts in model.routing_counts().items():
        load = counts.double()
        gate = model.model.layers[str(layer)].mlp.gate
        gate.e_score_correction_bias.add_(
            gamma * torch.sign(load.mean() - load).to(gate.e_score_correction_bias)
        )
    model.reset_routing()


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_num_threads(old)
        torch.set_flush_denormal(False)


def train(cfg: TrainConfig):
    """Train from scratch; returns (model, report dict)."""
    from dsv3tools.model.saving import random_model

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    mcfg = model_config(cfg)
    model = random_model(mcfg, dtype=torch.float32, seed=cfg.seed).train()
    model.set_attn_impl("naive")  # same function as the absorbed path; faster to train
    for counts_layer in model.routing_counts():
        model.model.layers[str(counts_layer)].mlp.gate.e_score_correction_bias.zero_()
    for layer in mcfg.mtp_layers:  # the MTP module shares embedding and head (saved as copies, as released)
        blk = model.model.layers[str(layer)]
        blk.embed_tokens.weight = model.model.embed_tokens.weight
        blk.shared_head.head.weight = model.lm_head.weight
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    train_lines = corpus.sample_lines(cfg.corpus, cfg.train_lines, seed=cfg.corpus.seed + 100)
    data = pack(train_lines, cfg.steps * cfg.batch, cfg.seq_len, gen)
    model.record_routing(True)
    curve = []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        main, mtp = losses(model, data[step * cfg.batch : (step + 1) * cfg.batch])
        loss = main + cfg.mtp_lambda * mtp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        balance_router_bias(model, cfg.bias_gamma)
        if step % 25 == 0 or step == cfg.steps - 1:
            curve.append({"step": step, "loss": main.item(), "mtp_loss": mtp.item()})
    model.record_routing(False)
    model.set_attn_impl("absorb")
    report = evaluate_heldout(model, cfg, data)
    report.update(curve=curve, train_seconds=time.perf_counter() - t0, config=asdict(cfg))
    report.update(cpu_capability=torch.backends.cpu.get_cpu_capability(), mkl_cbwr=os.environ.get("MKL_CBWR"))
    return model.eval(), report


@torch.no_grad()
def evaluate_heldout(model, cfg: TrainConfig, train_data: torch.Tensor) -> dict:
    """Held-out main/MTP loss against the unigram baseline, plus the final expert loads."""
    lines = corpus.sample_lines(cfg.corpus, cfg.heldout_lines, seed=cfg.corpus.seed + 200)
    held = pack(lines, cfg.heldout_seqs, cfg.seq_len, torch.Generator().manual_seed(cfg.seed + 1))
    model.reset_routing()
    model.record_routing(True)
    main, mtp = losses(model, held)
    loads = {str(k): v.tolist() for k, v in model.routing_counts().items()}
    model.record_routing(False)
    model.reset_routing()
    return {
        "heldout_loss": float(main),
        "heldout_mtp_loss": float(mtp),
        "unigram_loss": unigram_ce(train_data, held, model.config.vocab_size),
        "heldout_expert_loads": loads,
    }


def train_and_save(out: str | Path, cfg: TrainConfig | None = None) -> dict:
    """Train and write ``out`` as an FP8 checkpoint with the byte-level tokenizer and ``train_report.json``."""
    from dsv3tools.checkpoint.fsutil import atomic_write_json
    from dsv3tools.checkpoint.tokenizer import tokenizer_files
    from dsv3tools.model.saving import save_checkpoint

    cfg = cfg or TrainConfig()
    with _threads(cfg.threads):
        model, report = train(cfg)
    save_checkpoint(model, out, fmt="fp8", tokenizer_files=tokenizer_files())
    atomic_write_json(Path(out) / REPORT, report)
    return report


def config_from_dict(d: dict) -> TrainConfig:
    """The inverse of ``dataclasses.asdict`` for :class:`TrainConfig`."""
    return TrainConfig(**{**d, "corpus": CorpusConfig(**d["corpus"])})


def train_pinned(out: str | Path, cfg: TrainConfig) -> dict:
    """:func:`train_and_save` in a child process started with :data:`PINNED_ENV`; returns its report."""
    cmd = [
        sys.executable,
        "-m",
        "dsv3tools.evals.train_tiny",
        "--out",
        str(out),
        "--config",
        json.dumps(asdict(cfg)),
    ]
    r = subprocess.run(cmd, env={**os.environ, **PINNED_ENV}, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"training the tiny model failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads((Path(out) / REPORT).read_text())


def cache_key(cfg: TrainConfig) -> str:
    """Hash of the training code, the corpus code and the config."""
    h = hashlib.sha256()
    for mod in (__file__, corpus.__file__):
        h.update(Path(mod).read_bytes())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get("DSV3TOOLS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dsv3tools"


def trained_tiny(cache: bool = True, cfg: TrainConfig | None = None, root: str | Path | None = None) -> Path:
    """The trained tiny checkpoint's folder, training it once per cache key (``cache=False`` retrains)."""
    cfg = cfg or TrainConfig()
    base = Path(root) if root is not None else cache_root()
    base.mkdir(parents=True, exist_ok=True)
    final = base / f"trained-tiny-{cache_key(cfg)}"
    with open(base / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cache and (final / REPORT).is_file():
            return final
        tmp = base / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        train_pinned(tmp, cfg)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output checkpoint folder")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--config", help="a whole TrainConfig as JSON (overrides --steps)")
    args = ap.parse_args(argv)
    cfg = config_from_dict(json.loads(args.config)) if args.config else TrainConfig(steps=args.steps)
    report = train_and_save(args.out, cfg)
    keys = ("heldout_loss", "heldout_mtp_loss", "unigram_loss", "train_seconds")
    print(json.dumps({k: report[k] for k in keys}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
