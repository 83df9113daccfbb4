"""Multi-head latent attention (MLA, SPEC sec. 4) and its compressed KV cache.

Both paths share one cache: per token the normed latent ``c_kv`` (kv_lora_rank values) and the rotated
``k_pe`` (qk_rope_head_dim values), i.e. 576 values per token per layer at real size.

- ``naive``: expands ``kv_b(c_kv)`` into per-head ``k_nope | v`` over all cached positions.
- ``absorb``: folds W_UK into the query and W_UV after attention, attending over the latent directly
  (one shared 576-dim key and 512-dim value, like multi-query attention).
- ``auto``: per call, whichever of the two needs fewer multiply-adds: ``naive`` for a prefill (T close to
  S), ``absorb`` for decoding (T much smaller than S) -- what serving engines do.

Moonlight (``q_lora_rank`` null) projects the query with one ``q_proj`` instead of ``q_a_proj`` ->
``q_a_layernorm`` -> ``q_b_proj``. The local head count comes from the weights (query rows / qk_head_dim), so a tensor-parallel rank
holding a slice of the heads runs the same code.

DeepSeek-V3.2 (``cfg.has_indexer``): every layer also runs the DSA lightning indexer of
:mod:`dsv3tools.model.indexer` (whole on every tensor-parallel rank, so every rank selects the same keys);
its keys are cached beside the latent. While the keys number at most ``index_topk`` every causal key is
selected, so the dense paths above run unchanged; beyond that both paths attend to each query's selected
keys only, in query chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3tools.config import ModelConfig
from dsv3tools.model.indexer import Indexer, chunks, gather_chunk, selection_mask, sparse_absorb
from dsv3tools.model.linear import Linear, dequant_weight
from dsv3tools.model.rope import apply_rope

ATTN_IMPLS = ("naive", "absorb", "auto")


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` in float32, result in the input dtype; ``weight`` attached after construction."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.register_buffer("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight.to(x.dtype)


@dataclass
class LayerCache:
    """Compressed KV cache of one layer: ``kvpe [B, max_len, kv_lora_rank + rope_dim]`` with the views
    ``kv`` (normed latent) and ``pe`` (rotated shared key), so attention reads one tensor without a copy."""

    kvpe: torch.Tensor
    rank: int
    index_k: torch.Tensor | None = None  # V3.2: the indexer keys [B, max_len, index_head_dim]

    @property
    def kv(self) -> torch.Tensor:
        return self.kvpe[..., : self.rank]

    @property
    def pe(self) -> torch.Tensor:
        return self.kvpe[..., self.rank :]

    @classmethod
    def empty(
        cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> LayerCache:
        width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        index_k = None
        if cfg.has_indexer:
            index_k = torch.zeros(batch, max_len, cfg.index_head_dim, dtype=dtype, device=device)
        return cls(torch.zeros(batch, max_len, width, dtype=dtype, device=device), cfg.kv_lora_rank, index_k)

    def update(self, kv: torch.Tensor, pe: torch.Tensor, start: int) -> torch.Tensor:
        """Write positions ``start..start+T`` and return ``kvpe`` for everything up to there."""
        end = start + kv.shape[1]
        if end > self.kvpe.shape[1]:
            raise ValueError(f"KV cache holds {self.kvpe.shape[1]} positions; asked to write up to {end}")
        b = kv.shape[0]
        self.kvpe[:b, start:end, : self.rank] = kv
        self.kvpe[:b, start:end, self.rank :] = pe
        return self.kvpe[:b, :end]

    def update_index(self, k: torch.Tensor, start: int) -> torch.Tensor:
        """Write the indexer keys of positions ``start..start+T``; return all of them up to there."""
        b, end = k.shape[0], start + k.shape[1]
        self.index_k[:b, start:end] = k
        return self.index_k[:b, :end]


class MLA(nn.Module):
    """DeepSeek-V3 attention with a compressed query and key/value latent."""

    def __init__(self, cfg: ModelConfig, attn_impl: str = "absorb"):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        h, nh, blk = cfg.hidden_size, cfg.num_attention_heads, cfg.quant.block
        self.nope, self.rope, self.vdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank, self.scale, self.attn_impl = cfg.kv_lora_rank, cfg.softmax_scale, attn_impl
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(h, cfg.q_lora_rank, blk)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, blk)
        else:  # Moonlight: no query compression
            self.q_proj = Linear(h, nh * cfg.qk_head_dim, blk)
        self.kv_a_proj_with_mqa = Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, blk)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), blk)
        self.o_proj = Linear(nh * cfg.v_head_dim, h, blk)
        self.indexer = Indexer(cfg) if cfg.has_indexer else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        allowed: torch.Tensor | None,
        start_pos: int = 0,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """``x [B, T, H]``; ``allowed`` bool mask ``[B|1, 1, T, S]`` (True: attend; None: attend to all)."""
        b, t, _ = x.shape
        if hasattr(self, "q_proj"):
            qr, q = None, self.q_proj(x)
        else:
            qr = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(qr)
        q = q.view(b, t, -1, self.nope + self.rope)  # local heads from the weight's rows
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, *rope)
        kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        kv = self.kv_a_layernorm(kv)
        k_pe = apply_rope(k_pe, *rope)
        if cache is not None:
            kvpe = cache.update(kv, k_pe, start_pos)
        else:
            kvpe = torch.cat([kv, k_pe], dim=-1)
        s = kvpe.shape[1]
        if self.indexer is not None:
            ik = self.indexer.keys(x, rope)
            ik = cache.update_index(ik, start_pos) if cache is not None else ik
            if s > self.indexer.topk:  # else every causal key is selected: the dense paths below
                out = self._sparse(q_nope, q_pe, kvpe, allowed, (x, qr, rope, ik))
                return self.o_proj(out.reshape(b, t, -1))
        if self._use_naive(t, s):
            out = self._naive(q_nope, q_pe, kvpe, allowed)
        else:
            out = self._absorb(q_nope, q_pe, kvpe, allowed)
        return self.o_proj(out.reshape(b, t, -1))

    def _use_naive(self, t: int, s: int, k: int | None = None) -> bool:
        """``naive`` or ``absorb`` for T queries over S keys, of which ``k`` per query are attended by the
        absorbed path (DSA; default all S) (``auto``: fewer multiply-adds per head)."""
        if self.attn_impl != "auto":
            return self.attn_impl == "naive"
        k = s if k is None else k
        naive = s * self.rank * (self.nope + self.vdim) + t * s * (self.nope + self.rope + self.vdim)
        absorb = t * self.rank * (self.nope + self.vdim) + t * k * (2 * self.rank + self.rope)
        return naive < absorb

    def _expand(self, kvpe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys ``[B, S, nh, nope + rope]`` and values ``[B, S, nh, v]`` of the cached latent."""
        b, s, _ = kvpe.shape
        kv, k_pe = kvpe.split([self.rank, self.rope], dim=-1)
        kvb = self.kv_b_proj(kv).view(b, s, -1, self.nope + self.vdim)
        k_nope, v = kvb.split([self.nope, self.vdim], dim=-1)
        nh = k_nope.shape[2]
        return torch.cat([k_nope, k_pe.unsqueeze(2).expand(b, s, nh, self.rope)], dim=-1), v

    def _naive(self, q_nope, q_pe, kvpe, allowed) -> torch.Tensor:
        k, v = self._expand(kvpe)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, scale=self.scale
        )
        return out.transpose(1, 2)  # [B, T, nh, v]

    def _absorb_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK ``[nh, nope, rank]`` and W_UV ``[nh, v, rank]`` from ``kv_b_proj``."""
        w = dequant_weight(self.kv_b_proj, dtype).view(-1, self.nope + self.vdim, self.rank)
        return w[:, : self.nope], w[:, self.nope :]

    def _sparse(self, q_nope, q_pe, kvpe, allowed, index_in) -> torch.Tensor:
        """DSA: each query attends to the keys the indexer selects for it, in query chunks (see indexer)."""
        (b, t, nh, _), s = q_nope.shape, kvpe.shape[1]
        iq, iw = self.indexer.queries(*index_in[:3])
        keys = self.indexer.prepare(index_in[3])
        size = self.indexer.query_chunk(b, s)

        def select(c0: int, c1: int):
            return self.indexer.select(
                iq[:, c0:c1], iw[:, c0:c1], keys, None if allowed is None else allowed[:, 0, c0:c1]
            )

        if self._use_naive(t, s, self.indexer.topk):
            k, v = (z.transpose(1, 2) for z in self._expand(kvpe))
            q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
            out = q.new_empty(b, t, nh, self.vdim)
            for c0, c1 in chunks(t, size):
                m = selection_mask(*select(c0, c1), s)
                o = F.scaled_dot_product_attention(q[:, :, c0:c1], k, v, attn_mask=m, scale=self.scale)
                out[:, c0:c1] = o.transpose(1, 2)
            return out
        w_uk, w_uv = self._absorb_weights(q_nope.dtype)
        q = torch.cat([torch.einsum("bthd,hdc->bthc", q_nope, w_uk), q_pe], dim=-1)  # [B, T, nh, rank + rope]
        size = min(size, gather_chunk(b, min(self.indexer.topk, s), kvpe.shape[-1]))
        o_lat = q.new_empty(b, t, nh, self.rank)
        for c0, c1 in chunks(t, size):
            o_lat[:, c0:c1] = sparse_absorb(q[:, c0:c1], kvpe, *select(c0, c1), self.scale, self.rank)
        return torch.einsum("bthc,hdc->bthd", o_lat, w_uv)

    def _absorb(self, q_nope, q_pe, kvpe, allowed) -> torch.Tensor:
        w_uk, w_uv = self._absorb_weights(q_nope.dtype)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
        q = torch.cat([q_lat, q_pe], dim=-1).transpose(1, 2)  # [B, nh, T, rank + rope]
        k = kvpe.unsqueeze(1)  # [B, 1, S, rank + rope]
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(dim=-1).to(kvpe.dtype)
        o_lat = torch.matmul(probs, k[..., : self.rank])  # [B, nh, T, rank]
        return torch.einsum("bhtc,hdc->bthd", o_lat, w_uv)
