"""DeepSeek Sparse Attention (DSA, SPEC sec. 11): the V3.2 lightning indexer and the sparse MLA it drives.

The indexer scores every (query s, key t) pair with ``I[s,t] = sum_h w[s,h] * relu(q[s,h] . k[t] / sqrt(D))``
(``w = weights_proj(x) / sqrt(H)``, float32), masks non-causal and padding keys, and keeps the top
``min(index_topk, keys)`` keys per query; MLA's softmax then runs over those keys only. Its keys (one head,
``index_head_dim`` values per token) are cached beside MLA's latent cache.

Memory is bounded at long context: queries are taken in chunks so that one chunk's per-head logits
``[B, c, H, S]`` hold at most ``SCORE_CHUNK_ELEMS`` float32 values, and the attention over the selected keys
runs chunk by chunk too -- the absorbed path gathers each query's top-k latent rows (compute ``T * topk``),
the naive path masks its expanded keys to them (``scaled_dot_product_attention`` with a bool mask). No
``[T, T]`` float32 matrix per head is ever materialised.

``indexer_precision="fp8"`` scores the way DeepSeek's demo does: q and k rotated by an orthonormal
Walsh-Hadamard transform (dot products unchanged), then rounded to e4m3 with one float32 scale per
128-value block (``amax / 448``, a power of two under ``scale_fmt: ue8m0``); the products run in float32
over those values. The float32 default is the parity path (transformers' ``DeepseekV32Indexer``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3tools.config import ModelConfig
from dsv3tools.model.linear import Linear, linear
from dsv3tools.model.rope import apply_rope, apply_rope_half
from dsv3tools.quant.reference import FP8_MAX, round_scale_ue8m0

INDEXER_PRECISIONS = ("float32", "fp8")
SCORE_CHUNK_ELEMS = 1 << 24  # float32 per-head logits of one query chunk (64 MiB)
GATHER_CHUNK_ELEMS = 1 << 24  # gathered latent rows of one query chunk in the absorbed sparse path
LAYER_NORM_EPS = 1e-6
FP8_BLOCK = 128


class LayerNorm(nn.Module):
    """The indexer's ``k_norm``: LayerNorm with float32 ``weight`` and ``bias`` (attached after construction),
    computed in float32, result in the input dtype."""

    def __init__(self, dim: int, eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.register_buffer("weight", None)
        self.register_buffer("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), (self.dim,), w, b, self.eps).to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform over the last dim (a power of two), in float32."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two width, got {n}")
    y = x.float().reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.cat((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=-1)
        h *= 2
    return (y.reshape(x.shape) * n**-0.5).contiguous()


def fp8_round(x: torch.Tensor, scale_fmt: str = "float") -> torch.Tensor:
    """``x`` (float32, last dim a multiple of the block or shorter) rounded to e4m3 with one scale per block
    of ``FP8_BLOCK`` values (``amax / 448``; ``ue8m0``: rounded up to a power of two), returned dequantized."""
    n = x.shape[-1]
    block = min(FP8_BLOCK, n)
    xb = x.float().reshape(*x.shape[:-1], n // block, block)
    amax = xb.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    s = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        s = round_scale_ue8m0(s)
    q = (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).reshape(x.shape)


class Indexer(nn.Module):
    """The lightning indexer of one layer (HF names: ``self_attn.indexer.{wq_b,wk,k_norm,weights_proj}``)."""

    def __init__(self, cfg: ModelConfig, precision: str = "float32"):
        super().__init__()
        h, blk = cfg.hidden_size, cfg.quant.block
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.rope_dim, self.interleave = cfg.qk_rope_head_dim, cfg.indexer_rope_interleave
        self.scale_fmt = cfg.quant.scale_fmt
        self.precision = precision
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, blk)
        self.wk = Linear(h, self.head_dim, blk)
        self.k_norm = LayerNorm(self.head_dim)
        self.weights_proj = Linear(h, self.n_heads, blk)

    def _rope(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """RoPE on the leading ``qk_rope_head_dim`` values (half-split unless ``indexer_rope_interleave``)."""
        pe, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        pe = (apply_rope if self.interleave else apply_rope_half)(pe, *rope)
        return torch.cat([pe, rest], dim=-1)

    def keys(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The indexer keys ``[B, T, index_head_dim]`` of hidden states ``x`` (what the cache holds)."""
        return self._rope(self.k_norm(self.wk(x)), rope)

    def queries(
        self, x: torch.Tensor, qr: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries ``[B, T, H, D]``, float32 head weights ``[B, T, H]`` with both scales folded in)."""
        b, t, _ = x.shape
        q = self._rope(self.wq_b(qr).view(b, t, self.n_heads, self.head_dim), rope)
        w = linear(x.float(), self.weights_proj) * (self.n_heads**-0.5 * self.head_dim**-0.5)
        return q, w

    def prepare(self, t: torch.Tensor) -> torch.Tensor:
        """Queries or keys as scored: float32 (``fp8``: Hadamard-rotated, then rounded to e4m3 blocks)."""
        t = t.float()
        if self.precision == "fp8":
            t = fp8_round(hadamard(t), self.scale_fmt)
        return t

    def scores(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """float32 index scores ``[B, c, S]`` of a query chunk ``q [B, c, H, D]`` against prepared keys."""
        logits = torch.matmul(self.prepare(q), keys.unsqueeze(1).transpose(-1, -2))  # [B, c, H, S]
        return torch.matmul(w.unsqueeze(-2), logits.relu_()).squeeze(-2)

    def query_chunk(self, b: int, s: int) -> int:
        """Queries per chunk so that one chunk's per-head logits stay within ``SCORE_CHUNK_ELEMS``."""
        return max(1, SCORE_CHUNK_ELEMS // max(1, b * self.n_heads * s))

    def select(
        self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k key indices ``[B, c, k]`` of a query chunk and whether each is a real (allowed) key;
        ``allowed`` is the chunk's bool mask ``[B|1, c, S]`` (None: every key)."""
        sc = self.scores(q, w, keys)
        if allowed is not None:
            sc = sc.masked_fill(~allowed, float("-inf"))
        vals, idx = sc.topk(min(self.topk, sc.shape[-1]), dim=-1)
        return idx, vals > float("-inf")


def sparse_absorb(
    q: torch.Tensor, kvpe: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, scale: float, rank: int
) -> torch.Tensor:
    """Absorbed MLA over each query's selected latent rows: ``q [B, c, nh, rank + rope]`` (W_UK folded in),
    ``kvpe [B, S, rank + rope]``, ``idx``/``valid [B, c, k]``; returns the latent output ``[B, c, nh, rank]``."""
    b, c, k = idx.shape
    rows = torch.gather(kvpe, 1, idx.reshape(b, c * k, 1).expand(-1, -1, kvpe.shape[-1])).view(b, c, k, -1)
    sc = torch.matmul(q, rows.transpose(-1, -2)).float() * scale  # [B, c, nh, k]
    sc = sc.masked_fill(~valid.unsqueeze(2), float("-inf"))
    probs = sc.softmax(dim=-1).to(kvpe.dtype)
    return torch.matmul(probs, rows[..., :rank])


def selection_mask(idx: torch.Tensor, valid: torch.Tensor, s: int) -> torch.Tensor:
    """Bool ``[B, 1, c, S]``: True at each query's selected real keys."""
    b, c, _ = idx.shape
    return torch.zeros(b, c, s, dtype=torch.bool, device=idx.device).scatter_(-1, idx, valid).unsqueeze(1)


def gather_chunk(b: int, k: int, width: int) -> int:
    """Queries per chunk of the absorbed sparse path (bounded gathered rows)."""
    return max(1, GATHER_CHUNK_ELEMS // max(1, b * k * width))


def chunks(t: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, t)) for i in range(0, t, size)]
