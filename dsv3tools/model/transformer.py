"""The DeepSeek-V3 forward in plain PyTorch: embedding, decoder blocks (MLA + dense MLP or MoE), final norm
and head, the MTP module(s), KV caches for incremental decoding, padding masks and routing statistics.
In float16 the residual stream is carried rescaled by 1/routed_scaling_factor (vLLM's scheme, SPEC sec. 13)
and a module output that still overflows stops the forward naming the module (:class:`Float16Overflow`).

Module paths mirror the HF tensor names (``model.layers.3.mlp.experts.7.up_proj`` ...), so a checkpoint
tensor attaches to ``model.get_submodule(prefix)`` under its own suffix; see :mod:`dsv3tools.model.loading` for
loading (memory-mapped, or streamed layer by layer) and :mod:`dsv3tools.model.saving` for random init and
saving.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3tools.config import ModelConfig
from dsv3tools.errors import DSV3Error
from dsv3tools.model.attention import MLA, LayerCache, RMSNorm
from dsv3tools.model.indexer import INDEXER_PRECISIONS, Indexer
from dsv3tools.model.linear import Linear, resolve_model_backend
from dsv3tools.model.moe import MLP, Gate, MoE
from dsv3tools.model.rope import cos_sin, inv_freq

ROPE_TABLE_MIN = 256  # positions in the first cos/sin table (grown by doubling)


class Float16Overflow(DSV3Error):
    """The float16 forward reached inf or NaN; names the first module whose output did."""


def _finite(h: torch.Tensor, where: str) -> torch.Tensor:
    """``h`` unchanged, or :class:`Float16Overflow` naming ``where`` when it holds inf or NaN."""
    if not bool(torch.isfinite(h).all()):
        peak = h.float().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().max()
        raise Float16Overflow(
            f"{where}: the float16 forward overflows here (inf/NaN; float16 holds |x| <= 65504, the finite "
            f"values reach {float(peak):.4g}) even with the residual rescaled by 1/routed_scaling_factor; "
            "run with --dtype bfloat16 or float32"
        )
    return h


class Embedding(nn.Module):
    """Token embedding table ``weight [vocab, hidden]`` (attached after construction)."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.vocab, self.dim = vocab, dim
        self.register_buffer("weight", None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids.to(self.weight.device), self.weight)


class SharedHead(nn.Module):
    """The MTP module's output norm and head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size, cfg.quant.block)


class Block(nn.Module):
    """One decoder layer; an MTP layer (id >= num_hidden_layers) also owns its input and output extras."""

    def __init__(self, cfg: ModelConfig, layer: int, attn_impl: str, expert_ids: list[int] | None = None):
        super().__init__()
        h, eps, blk = cfg.hidden_size, cfg.rms_norm_eps, cfg.quant.block
        self.layer_id = layer
        self.inv_scale = 1.0 / cfg.routed_scaling_factor  # the float16 residual's units (_forward_fp16)
        self.enters_stream = layer == 0 or layer >= cfg.num_hidden_layers
        self.self_attn = MLA(cfg, attn_impl)
        self.mlp = MoE(cfg, expert_ids) if cfg.is_moe(layer) else MLP(h, cfg.intermediate_size, blk)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        if layer >= cfg.num_hidden_layers:
            self.embed_tokens = Embedding(cfg.vocab_size, h)
            self.enorm = RMSNorm(h, eps)
            self.hnorm = RMSNorm(h, eps)
            self.eh_proj = Linear(2 * h, h, blk)
            self.shared_head = SharedHead(cfg)

    def forward(self, x, rope, allowed, start_pos: int = 0, cache: LayerCache | None = None) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), rope, allowed, start_pos, cache)
        if x.dtype == torch.float16:
            return self._forward_fp16(x, a)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))

    def _forward_fp16(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The float16 residual stream (SPEC sec. 13), vLLM's DeepSeek scheme: it is carried in units of
        ``1 / routed_scaling_factor`` (the attention and dense-MLP outputs are divided by the factor, the
        MoE leaves its routed sum unscaled and divides the shared expert's output; the layer where the
        stream enters, layer 0 or an MTP layer, divides its input residual once). Every RMSNorm reading
        the stream is scale-invariant, so the logits are unchanged while the stream is 1/s as large.
        A sub-layer output that still reaches inf stops the forward with :class:`Float16Overflow`."""
        if self.inv_scale != 1.0:
            a = a * self.inv_scale
            if self.enters_stream:
                x = x * self.inv_scale
        x = _finite(x + a, f"model.layers.{self.layer_id}.self_attn")
        m = self.mlp(self.post_attention_layernorm(x))
        if self.inv_scale != 1.0 and not isinstance(self.mlp, MoE):
            m = m * self.inv_scale
        return _finite(x + m, f"model.layers.{self.layer_id}.mlp")


class Decoder(nn.Module):
    """``model.*``: embedding, the main and MTP layers keyed by layer id, final norm."""

    def __init__(self, cfg: ModelConfig, attn_impl: str, expert_ids: list[int] | None):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i, attn_impl, expert_ids) for i in cfg.all_layers})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class ModelCache:
    """Per-layer compressed KV caches (main and MTP layers, keyed by layer id) and the key padding mask."""

    layers: dict[int, LayerCache]
    mask: torch.Tensor  # bool [B, max_len]; False = padding
    padded: bool = False  # whether any False was written to ``mask`` (else positions are plain offsets)

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]


class Transformer(nn.Module):
    """DeepSeek-V3 over attached weights in any stored format; returns float32 logits."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: torch.dtype = torch.bfloat16,
        attn_impl: str = "absorb",
        backend: str = "dequant",
        device: torch.device | str = "cpu",
        expert_ids: list[int] | None = None,
    ):
        super().__init__()
        self.config, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.tokenizer_path = None
        self.streamer = None  # set by model.loading for layer streaming (offload)
        self.model = Decoder(cfg, attn_impl, expert_ids)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, cfg.quant.block)
        self.register_buffer("freqs", inv_freq(cfg).to(self.device), persistent=False)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.set_backend(backend)

    # ---- configuration -----------------------------------------------------------------------------
    def set_backend(self, backend: str) -> None:
        """Route every linear through ``backend`` (auto | dequant | torch | triton)."""
        resolved = resolve_model_backend(backend, self.device)
        for m in self.modules():
            if isinstance(m, Linear):
                m.backend = resolved
        self.backend = resolved

    @torch.no_grad()
    def materialize(self) -> None:
        """Convert every weight once into the compute dtype (what the ``dequant`` backend computes per use,
        so the logits are unchanged): linears dequantized, routed experts stacked (see :class:`MoE`), norms
        and router in their compute dtypes. Trades memory (the compute dtype's bytes per parameter) for
        speed; the embedding table stays as stored (only looked-up rows are converted)."""
        for m in self.modules():
            if isinstance(m, MoE):
                m.stack_experts(self.dtype)
        for m in self.modules():
            if isinstance(m, Linear) and m.fmt != "empty":
                m.materialize(self.dtype)
            elif isinstance(m, RMSNorm) and m.weight is not None:
                m.weight = m.weight.to(self.dtype)
            elif isinstance(m, Gate) and m.weight is not None:
                m.weight = m.weight.float()
                m.e_score_correction_bias = m.e_score_correction_bias.float()

    def set_indexer_precision(self, precision: str) -> None:
        """V3.2: score the DSA indexer in ``float32`` (the parity default) or ``fp8`` (DeepSeek's demo)."""
        if precision not in INDEXER_PRECISIONS:
            raise ValueError(f"indexer_precision must be one of {INDEXER_PRECISIONS}, got {precision!r}")
        for m in self.modules():
            if isinstance(m, Indexer):
                m.precision = precision

    def set_attn_impl(self, attn_impl: str) -> None:
        for m in self.modules():
            if isinstance(m, MLA):
                m.attn_impl = attn_impl

    def record_routing(self, on: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, MoE):
                m.record = on

    def reset_routing(self) -> None:
        for m in self.modules():
            if isinstance(m, MoE):
                m.counts.zero_()

    def routing_counts(self) -> dict[int, torch.Tensor]:
        """Tokens routed to each expert per MoE layer since the last reset (MTP layers included)."""
        return {int(k): b.mlp.counts.clone() for k, b in self.model.layers.items() if isinstance(b.mlp, MoE)}

    def new_cache(self, batch_size: int, max_len: int) -> ModelCache:
        """Empty caches for ``batch_size`` sequences of up to ``max_len`` positions (main + MTP layers)."""
        layers = {
            i: LayerCache.empty(self.config, batch_size, max_len, self.dtype, self.device)
            for i in self.config.all_layers
        }
        return ModelCache(layers, torch.ones(batch_size, max_len, dtype=torch.bool, device=self.device))

    # ---- masks and positions -----------------------------------------------------------------------
    def _key_mask(
        self, attention_mask, cache: ModelCache | None, start_pos: int, b: int, t: int
    ) -> torch.Tensor | None:
        """Bool key mask over the attended keys (``[B, start_pos + T]`` with a cache, else ``[B, T]``)."""
        end = start_pos + t
        m = None if attention_mask is None else attention_mask.to(device=self.device, dtype=torch.bool)
        if cache is None:
            if m is not None and m.shape != (b, t):
                raise ValueError(
                    f"attention_mask must be [B, T] = {[b, t]} without a cache, got {list(m.shape)}"
                )
            return m
        if m is not None:
            if m.shape == (b, end):
                cache.mask[:b, :end] = m
            elif m.shape == (b, t):
                cache.mask[:b, start_pos:end] = m
            else:
                raise ValueError(f"attention_mask must be [B, {end}] or [B, {t}], got {list(m.shape)}")
            cache.padded = cache.padded or not bool(m.all())
        return cache.mask[:b, :end] if cache.padded else None

    def _rope_and_mask(self, key_mask, cache, start_pos: int, b: int, t: int):
        """Per-token cos/sin (positions count only non-padding tokens) and the bool attention mask."""
        q_off = start_pos if cache is not None else 0
        n_keys = start_pos + t if cache is not None else t
        if key_mask is None:
            rope = self._rope_table(start_pos + t)
            rope = tuple(r[start_pos : start_pos + t].expand(b, t, -1) for r in rope)
        else:
            pos = (key_mask.long().cumsum(1) - 1).clamp(min=0)[:, -t:] + (start_pos - q_off)
            rope = cos_sin(self.freqs, pos)
        if key_mask is None and t == 1:
            return rope, None
        q_idx = torch.arange(q_off, q_off + t, device=self.device)[:, None]
        k_idx = torch.arange(n_keys, device=self.device)[None, :]
        allowed = (k_idx <= q_idx).unsqueeze(0)
        if key_mask is not None:
            allowed = allowed & (key_mask[:, None, :] | (k_idx == q_idx))
        return rope, allowed.unsqueeze(1)

    def _rope_table(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[n', dim/2]`` for positions ``0..n'-1`` (``n' >= n``), computed once and grown by doubling;
        the same values :func:`cos_sin` gives for those positions."""
        if self._rope is None or self._rope[0].shape[0] < n or self._rope[0].device != self.freqs.device:
            size = max(n, 2 * (0 if self._rope is None else self._rope[0].shape[0]), ROPE_TABLE_MIN)
            self._rope = cos_sin(self.freqs, torch.arange(size, device=self.device)[None])
            self._rope = (self._rope[0][0], self._rope[1][0])
        return self._rope

    # ---- forward ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stream(self, unit: int | str) -> Iterator[None]:
        """Load a unit's weights for its use (layer streaming); a no-op when everything is attached."""
        if self.streamer is None:
            yield
            return
        with self.streamer.use(self, unit):
            yield

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        start_pos: int = 0,
        cache: ModelCache | None = None,
        attention_mask: torch.Tensor | None = None,
        return_hidden: bool = False,
        logits_to_keep: int = 0,
    ):
        """Logits float32 ``[B, T, vocab]`` (and post-norm hidden ``[B, T, H]`` with ``return_hidden``);
        ``logits_to_keep > 0`` computes the head for the last that many positions only (a prefill that
        only needs the next token)."""
        b, t = input_ids.shape
        key_mask = self._key_mask(attention_mask, cache, start_pos, b, t)
        rope, allowed = self._rope_and_mask(key_mask, cache, start_pos, b, t)
        with self._stream("embed"):
            h = self.model.embed_tokens(input_ids).to(self.dtype)
        for i in range(self.config.num_hidden_layers):
            with self._stream(i):
                h = self.model.layers[str(i)](h, rope, allowed, start_pos, cache.layers[i] if cache else None)
        with self._stream("head"):
            h = self.model.norm(h)
            logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
            logits = (_finite(logits, "lm_head") if logits.dtype == torch.float16 else logits).float()
        return (logits, h) if return_hidden else logits

    def mtp_forward(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        *,
        depth: int = 0,
        start_pos: int = 0,
        cache: ModelCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module ``depth`` (SPEC sec. 4): ``hidden`` is the main model's post-norm state at positions
        ``i`` (or the previous depth's output), ``next_ids`` the tokens ``i + 1``. Returns (float32 logits,
        the post ``shared_head.norm`` hidden state to chain into the next depth)."""
        layer = self.config.num_hidden_layers + depth
        if depth >= self.config.num_nextn_predict_layers:
            raise ValueError(
                f"MTP depth {depth}: the checkpoint has {self.config.num_nextn_predict_layers} MTP layers"
            )
        b, t = next_ids.shape
        key_mask = self._key_mask(attention_mask, cache, start_pos, b, t)
        rope, allowed = self._rope_and_mask(key_mask, cache, start_pos, b, t)
        with self._stream(layer):
            blk = self.model.layers[str(layer)]
            e = blk.enorm(blk.embed_tokens(next_ids).to(self.dtype))
            x = blk.eh_proj(torch.cat([e, blk.hnorm(hidden.to(self.dtype))], dim=-1))
            x = blk(x, rope, allowed, start_pos, cache.layers[layer] if cache else None)
            out = blk.shared_head.norm(x)
            logits = blk.shared_head.head(out)
            logits = (
                _finite(logits, f"model.layers.{layer}.shared_head")
                if logits.dtype == torch.float16
                else logits
            ).float()
        return logits, out
