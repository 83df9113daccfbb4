"""Text generation with the built-in forward: greedy or temperature-sampled decoding with the compressed KV cache (batches left-padded with an attention mask)."""

from __future__ import annotations

from typing import Any

import torch

from dsv3tools.checkpoint.tokenizer import encode, load_tokenizer
from dsv3tools.errors import DSV3Error
from dsv3tools.model.api import load_model


def _pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (n - len(s)) + list(s) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """Next tokens ``[B]`` from last-position logits ``[B, V]`` (argmax at temperature 0)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(logits.device)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_ids: list[int] | list[list[int]],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[int] | list[list[int]]:
    """Decode up to ``max_new_tokens`` after ``prompt_ids`` (one list, or a batch of lists).

    Greedy at ``temperature`` 0, sampling otherwise (``seed`` makes it reproducible). Returns the new
    token ids (per sequence for a batch); a sequence stops after it emits EOS (kept in the output).
    ``tokenizer`` is accepted for API symmetry; decoding needs only ids.
    """
    del tokenizer
    single = bool(prompt_ids) and isinstance(prompt_ids[0], int)
    seqs = [list(prompt_ids)] if single else [list(s) for s in prompt_ids]
    if not seqs or any(not s for s in seqs):
        raise DSV3Error("generate: every prompt needs at least one token")
    cfg = model.config
    ids, mask = _pad_left(seqs, cfg.eos_token_id)
    device = getattr(model, "device", torch.device("cpu"))
    ids, mask = ids.to(device), mask.to(device)
    b, t = ids.shape
    cache = model.new_cache(b, t + max_new_tokens)
    gen = torch.Generator().manual_seed(seed)
    logits = model(ids, cache=cache, attention_mask=mask, logits_to_keep=1)[:, -1]
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    pos = t
    for step in range(max_new_tokens):
        nxt = _pick(logits, temperature, gen)
        for i, tok in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(tok)
                done[i] = tok == cfg.eos_token_id
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(nxt.view(b, 1), start_pos=pos, cache=cache)[:, -1]
        pos += 1
    return out[0] if single else out


def run_generate(
    model_path: str,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    mtp: bool = False,
    mtp_k: int = 1,
    device: str = "cpu",
    offload: bool = False,
    dtype: torch.dtype | None = None,
) -> dict:
    """What ``dsv3tools generate`` does: load (compute ``dtype``, default bf16), encode (under the
    checkpoint's BOS policy), decode; returns ids and text."""
    tok = load_tokenizer(model_path)  # before the weights: a missing tokenizer file fails fast
    model = load_model(model_path, device=device, offload=offload, dtype=dtype)
    if mtp and not model.config.num_nextn_predict_layers:
        raise DSV3Error(f"--model {model_path}: no MTP layer (num_nextn_predict_layers 0); drop --mtp")
    prompt_ids = encode(tok, prompt, model.config.bos_token_id)
    if mtp:
        if temperature > 0:
            raise DSV3Error("--mtp speculative decoding is greedy; drop --temperature")
        try:
            from dsv3tools.evals.mtp import speculative_generate
        except ImportError:
            raise DSV3Error(
                "--mtp needs dsv3tools.evals.mtp (MTP speculative decoding), which is not installed"
            ) from None
        result = speculative_generate(model, prompt_ids, max_new_tokens, mtp_k)
        new = list(result[0] if isinstance(result, tuple) else result)
    else:
        new = generate(model, tok, prompt_ids, max_new_tokens, temperature, seed)
    return {"prompt_ids": prompt_ids, "ids": new, "text": tok.decode(new, skip_special_tokens=False)}
