"""Rotary position embedding with YaRN (SPEC sec. 4): frequencies, per-token cos/sin, interleaved rotation.

DeepSeek's RoPE is interleaved: adjacent pairs ``(x[2i], x[2i+1])`` form one complex number rotated by
frequency ``i``; no weight permutation is needed. YaRN is applied from the config always.
"""

from __future__ import annotations

import math

import torch

from dsv3tools.config import ModelConfig


def _correction_dim(num_rot: float, dim: int, base: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (num_rot * 2 * math.pi)) / (2 * math.log(base))


def yarn_range(cfg: ModelConfig) -> tuple[int, int]:
    """(low, high) dims of the YaRN ramp: floor/ceil of the beta_fast/beta_slow correction dims."""
    rs, dim = cfg.rope_scaling_dict, cfg.qk_rope_head_dim
    orig = int(rs.get("original_max_position_embeddings", cfg.max_position_embeddings))
    low = math.floor(_correction_dim(float(rs.get("beta_fast", 32)), dim, cfg.rope_theta, orig))
    high = math.ceil(_correction_dim(float(rs.get("beta_slow", 1)), dim, cfg.rope_theta, orig))
    return max(low, 0), min(high, dim - 1)


def inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """float32 ``[qk_rope_head_dim / 2]`` inverse frequencies, YaRN-corrected when rope_scaling is yarn."""
    dim = cfg.qk_rope_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = cfg.rope_scaling_dict
    factor = float(rs.get("factor", 1.0)) if rs else 1.0
    if factor <= 1.0:
        return freqs
    low, high = yarn_range(cfg)
    span = (high - low) if high > low else 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / span).clamp(0, 1)
    smooth = 1 - ramp  # 1 keeps the base frequency (low dims), 0 divides it by the factor
    return freqs / factor * (1 - smooth) + freqs * smooth


def cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin ``[B, T, dim/2]`` for integer ``positions [B, T]``."""
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs.to(positions.device)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [B, T, ..., dim]`` (float32 math, result in ``x.dtype``)."""
    shape = x.shape
    xf = x.float().reshape(*shape[:-1], shape[-1] // 2, 2)
    extra = xf.dim() - cos.dim() - 1  # head dims between T and the pairs
    c = cos.reshape(*cos.shape[:2], *([1] * extra), cos.shape[-1])
    s = sin.reshape(*sin.shape[:2], *([1] * extra), sin.shape[-1])
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.reshape(shape).to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the half-split layout: ``x[i]`` pairs with ``x[i + dim/2]`` (the V3.2 indexer's RoPE, SPEC sec. 11;
    float32 math, result in ``x.dtype``)."""
    xf = x.float()
    half = xf.shape[-1] // 2
    extra = xf.dim() - cos.dim()  # head dims between T and the rotated dim
    c = cos.reshape(*cos.shape[:2], *([1] * extra), cos.shape[-1])
    s = sin.reshape(*sin.shape[:2], *([1] * extra), sin.shape[-1])
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
