"""Greedy decoding and MTP speculative decoding (SPEC sec. 4 and 8), batch size 1, on the KV cache.

Speculative step (k drafts): the MTP module drafts ``d1`` from the main model's post-norm hidden state
at the last verified position and the token after it; ``d2..dk`` chain it by feeding its own post
``shared_head.norm`` output as the next hidden state. The main model verifies ``[t, d1..dk]`` in one
forward over the cache; drafts are accepted while they equal the main model's greedy choice, and the
main model's choice after the last accepted draft is the bonus token. Caches are position-indexed, so
rolling back past a rejection is just writing the next step at the first rejected position. Output
tokens therefore equal plain greedy decoding (lossless) up to floating-point ties.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

StopFn = Callable[[list[int]], bool]


@dataclass
class SpecStats:
    """Counters of one or more speculative runs (named as vLLM reports them)."""

    k: int
    steps: int = 0  # verify forwards
    proposed: int = 0
    accepted: int = 0
    accepted_at: list[int] = field(default_factory=list)  # per draft position
    main_forwards: int = 0
    new_tokens: int = 0

    def add(self, other: SpecStats) -> None:
        self.steps += other.steps
        self.proposed += other.proposed
        self.accepted += other.accepted
        self.main_forwards += other.main_forwards
        self.new_tokens += other.new_tokens
        self.accepted_at = [
            a + b for a, b in zip(self.accepted_at or [0] * self.k, other.accepted_at, strict=True)
        ]

    def summary(self) -> dict:
        steps = max(self.steps, 1)
        return {
            "k": self.k,
            "alpha": self.accepted / max(self.proposed, 1),
            "tau": 1 + self.accepted / steps,
            "per_position": [a / steps for a in (self.accepted_at or [0] * self.k)],
            "verify_steps": self.steps,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "forwards_per_token": self.main_forwards / max(self.new_tokens, 1),
        }


def _ids(tokens: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.long, device=device)


@torch.no_grad()
def greedy_generate(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    stop: StopFn | None = None,
) -> tuple[list[int], int]:
    """Plain greedy decoding with the KV cache: (new token ids, main-model forwards)."""
    prompt = list(prompt_ids)
    if max_new_tokens <= 0:
        return [], 0
    cache = model.new_cache(1, len(prompt) + max_new_tokens)
    logits = model(_ids(prompt, model.device), start_pos=0, cache=cache)
    forwards, out = 1, [int(logits[0, -1].argmax())]
    while len(out) < max_new_tokens and out[-1] != eos_id and not (stop and stop(out)):
        logits = model(_ids(out[-1:], model.device), start_pos=len(prompt) + len(out) - 1, cache=cache)
        forwards += 1
        out.append(int(logits[0, -1].argmax()))
    return out, forwards


def _draft(model, hidden: torch.Tensor, next_ids: list[int], start: int, k: int, cache) -> list[int]:
    """k greedy drafts: MTP over (hidden at positions start.., tokens after them), then chained."""
    logits, out = model.mtp_forward(hidden, _ids(next_ids, model.device), start_pos=start, cache=cache)
    drafts = [int(logits[0, -1].argmax())]
    pos = start + len(next_ids)
    while len(drafts) < k:
        logits, out = model.mtp_forward(
            out[:, -1:], _ids(drafts[-1:], model.device), start_pos=pos, cache=cache
        )
        drafts.append(int(logits[0, -1].argmax()))
        pos += 1
    return drafts


@torch.no_grad()
def speculative_generate(
    model, prompt_ids: list[int], max_new_tokens: int, k: int = 1
) -> tuple[list[int], SpecStats]:
    """Greedy generation with ``k`` MTP drafts per main-model verify step: (new token ids, stats)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not model.config.num_nextn_predict_layers:
        raise ValueError("the checkpoint has no MTP layer (num_nextn_predict_layers is 0)")
    prompt = list(prompt_ids)
    stats = SpecStats(k=k, accepted_at=[0] * k)
    if max_new_tokens <= 0:
        return [], stats
    cache = model.new_cache(1, len(prompt) + max_new_tokens + k + 1)
    logits, hidden = model(_ids(prompt, model.device), start_pos=0, cache=cache, return_hidden=True)
    stats.main_forwards = 1
    out = [int(logits[0, -1].argmax())]
    n = len(prompt)  # position of out[-1], the last verified token (not yet in the main cache)
    drafts = _draft(model, hidden, prompt[1:] + out, 0, k, cache)
    while len(out) < max_new_tokens:
        logits, hidden = model(
            _ids(out[-1:] + drafts, model.device), start_pos=n, cache=cache, return_hidden=True
        )
        stats.main_forwards += 1
        greedy = logits[0].argmax(-1).tolist()  # greedy[j]: the main model's token at position n + j + 1
        a = 0
        while a < k and drafts[a] == greedy[a]:
            stats.accepted_at[a] += 1
            a += 1
        stats.steps, stats.proposed, stats.accepted = stats.steps + 1, stats.proposed + k, stats.accepted + a
        new = drafts[:a] + [greedy[a]]
        out += new
        if len(out) >= max_new_tokens:
            break
        drafts = _draft(model, hidden[:, : a + 1], new, n, k, cache)
        n += a + 1
    out = out[:max_new_tokens]
    stats.new_tokens = len(out)
    return out, stats


def bench(model, prompts: list[list[int]], max_new_tokens: int, k: int) -> dict:
    """Speculative vs plain greedy on every prompt: acceptance stats, losslessness and wall-time ratio."""
    total = SpecStats(k=k, accepted_at=[0] * k)
    t_plain = t_spec = 0.0
    lossless, mismatches = True, []
    for i, p in enumerate(prompts):
        t0 = time.perf_counter()
        ref, _ = greedy_generate(model, p, max_new_tokens)
        t1 = time.perf_counter()
        got, st = speculative_generate(model, p, max_new_tokens, k)
        t2 = time.perf_counter()
        t_plain, t_spec = t_plain + (t1 - t0), t_spec + (t2 - t1)
        total.add(st)
        if got != ref:
            lossless = False
            mismatches.append(i)
    return dict(
        total.summary(),
        lossless=lossless,
        mismatched_prompts=mismatches,
        prompts=len(prompts),
        max_new_tokens=max_new_tokens,
        speedup_wall=t_plain / max(t_spec, 1e-9),
    )


def randomize_mtp(model, seed: int = 0) -> None:
    """Replace the MTP layers' own weights by fresh random ones (``synth.random_weight``), keeping their
    embedding and head copies: the same model with an untrained MTP module, the acceptance baseline."""
    from dsv3tools.checkpoint.layout import layer_of, model_weights
    from dsv3tools.checkpoint.synth import random_weight
    from dsv3tools.model.loading import attach

    mtp = set(model.config.mtp_layers)
    for w in model_weights(model.config):
        if layer_of(w.name) not in mtp or w.name.endswith(("embed_tokens.weight", "shared_head.head")):
            continue
        value = random_weight(w, seed).to(device=model.device)
        if w.linear:
            layer = model.get_submodule(w.name)
            layer.clear()
            layer.weight = value.to(model.dtype)
        else:
            attach(
                model, w.name, value if w.name.endswith("e_score_correction_bias") else value.to(model.dtype)
            )
