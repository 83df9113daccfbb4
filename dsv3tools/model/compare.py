"""``compare``: run two checkpoints on the same prompts (float32 compute unless told otherwise) and measure how their next-token
distributions differ: KL(A||B) mean and max over positions, top-1 agreement, max abs logit difference.
One model is in memory at a time: A's logits are kept, A is freed, then B runs. Each side has its own compute
dtype, so one checkpoint compared with itself measures a dtype (``--dtype float16 --against-dtype float32``)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

from dsv3tools.checkpoint.tokenizer import encode, load_tokenizer
from dsv3tools.errors import DSV3Error
from dsv3tools.model.api import load_model, model_config

DEFAULT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "DeepSeek-V3 is a mixture-of-experts language model with multi-head latent attention.",
    "Paris is the capital of France; Berlin is the capital of",
    "1, 1, 2, 3, 5, 8, 13, 21, 34,",
]


def read_prompts(path: str | Path | None) -> list[str]:
    """Prompts from a file (one per line, or JSONL with a ``prompt``/``text`` field); built-ins if None."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    if not p.is_file():
        raise DSV3Error(f"{p}: no such prompts file")
    prompts = []
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise DSV3Error(f"{p}: a line starting with '{{' is not valid JSON") from None
            line = obj.get("prompt") or obj.get("text") or ""
        prompts.append(line)
    if not prompts:
        raise DSV3Error(f"{p}: no prompts in the file")
    return prompts


@torch.inference_mode()
def _logits(
    path: str | Path, batches: list[list[int]], device: str, backend: str, offload: bool, dtype: torch.dtype
) -> list[torch.Tensor]:
    model = load_model(path, device=device, dtype=dtype, backend=backend, offload=offload)
    out = [model(torch.tensor([ids], device=model.device))[0].cpu() for ids in batches]
    del model
    gc.collect()
    return out


def logit_stats(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    """KL(A||B) per position (mean, max), top-1 agreement and max abs logit difference."""
    la, lb = torch.cat(a).double(), torch.cat(b).double()
    if la.shape != lb.shape:
        raise DSV3Error(
            f"the models disagree on logits shape: {list(la.shape)} vs {list(lb.shape)} (different vocab?)"
        )
    pa, pb = la.log_softmax(-1), lb.log_softmax(-1)
    kl = (pa.exp() * (pa - pb)).sum(-1).clamp(min=0)
    return {
        "positions": int(kl.numel()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).double().mean()),
        "max_abs_logit_diff": float((la - lb).abs().max()),
    }


def compare(
    model_a: str | Path,
    model_b: str | Path,
    prompts: list[str] | None = None,
    *,
    device: str = "cpu",
    backend: str = "auto",
    offload: bool = False,
    dtype: torch.dtype = torch.float32,
    against_dtype: torch.dtype | None = None,
) -> dict:
    """Compare two checkpoints on ``prompts`` (default built-ins), tokenized with A's tokenizer; A computes
    in ``dtype``, B in ``against_dtype`` (default: the same)."""
    bos = model_config(model_a).bos_token_id
    model_config(model_b)  # B's validation gate too, before any forward
    tok = load_tokenizer(model_a)
    batches = [encode(tok, p, bos) for p in (prompts or DEFAULT_PROMPTS)]
    la = _logits(model_a, batches, device, backend, offload, dtype)
    lb = _logits(model_b, batches, device, backend, offload, against_dtype or dtype)
    dtypes = {
        "dtype": str(dtype).removeprefix("torch."),
        "against_dtype": str(against_dtype or dtype).removeprefix("torch."),
    }
    return {
        "model": str(model_a),
        "against": str(model_b),
        "prompts": len(batches),
        **dtypes,
        **logit_stats(la, lb),
    }
