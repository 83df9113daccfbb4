"""``dsv3tools expert-load``: run prompts through the built-in forward (and the MTP module when the
checkpoint has one) and record how many tokens the router sends to each expert of each MoE layer.

The result is the expert-load file of SPEC sec. 6, ``{"layers": {"<layer id>": [tokens per expert]}}``
(plus ``prompts``/``tokens`` bookkeeping), which ``reshard --expert-load`` reads. Prompts run one at a
time, so no padding token is ever counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dsv3tools.checkpoint.tokenizer import encode, load_tokenizer
from dsv3tools.errors import DSV3Error
from dsv3tools.model.api import load_model
from dsv3tools.model.loading import missing_weights


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a text file, one prompt per line."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DSV3Error(f"{p}: prompts file not found; pass --prompts FILE (one prompt per line)") from None
    except UnicodeDecodeError:
        raise DSV3Error(f"{p}: not UTF-8 text; pass a text file with one prompt per line") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise DSV3Error(f"{p}: no prompts (the file has no non-empty line)")
    return prompts


@torch.inference_mode()
def count_routing(model: Any, token_ids: list[list[int]], mtp: bool = True) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert per MoE layer over ``token_ids``: the main layers, and (``mtp``) the
    MTP layers fed with the main model's post-norm hidden states and the next tokens."""
    cfg = model.config
    depths = cfg.num_nextn_predict_layers if mtp else 0
    model.reset_routing()
    model.record_routing(True)
    try:
        for ids in token_ids:
            x = torch.tensor([ids], dtype=torch.long, device=getattr(model, "device", "cpu"))
            _, hidden = model(x, return_hidden=True)
            for depth in range(depths):
                if x.shape[1] < 2:
                    break
                _, hidden = model.mtp_forward(hidden[:, :-1], x[:, 1:], depth=depth)
                x = x[:, 1:]
    finally:
        model.record_routing(False)
    counts = model.routing_counts()
    return {k: v for k, v in counts.items() if mtp or k < cfg.num_hidden_layers}


def has_mtp_weights(model: Any) -> bool:
    """Whether every MTP layer of the config has its weights attached (split-mtp main folders do not)."""
    prefixes = tuple(f"model.layers.{lid}." for lid in model.config.mtp_layers)
    return bool(prefixes) and not any(m.startswith(prefixes) for m in missing_weights(model))


def expert_load(
    model_path: str | Path,
    prompts_file: str | Path,
    *,
    device: str = "cpu",
    max_tokens: int = 4096,
) -> dict[str, Any]:
    """Run every prompt (BOS prepended, cut to ``max_tokens``) and return the expert-load object."""
    prompts = read_prompts(prompts_file)
    model = load_model(model_path, device=device)
    tok = load_tokenizer(model)
    token_ids = [encode(tok, text, model.config.bos_token_id)[:max_tokens] for text in prompts]
    counts = count_routing(model, token_ids, mtp=has_mtp_weights(model))
    return {
        "model": str(model_path),
        "prompts": len(prompts),
        "tokens": sum(len(t) for t in token_ids),
        "layers": {str(k): [int(x) for x in v.tolist()] for k, v in sorted(counts.items())},
    }
